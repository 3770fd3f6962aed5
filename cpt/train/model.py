"""The model a stage trains: any Hugging Face causal LM, from a checkpoint or from a config."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cpt.errors import CptError, first_line
from cpt.paths import gguf_path, local_dir
from cpt.train.partitioned import load_partitions, match_names, read_index, safetensors_files

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from cpt.config.overrides import ModelOverrides


def model_config(
    model: str | dict[str, Any], *, trust_remote_code: bool = False, gguf_file: str | None = None
) -> PretrainedConfig:
    """The architecture of ``model`` (a local directory, hub id or ``{"config": {...}}``), without its weights;
    read from the GGUF file ``gguf_file`` of ``model`` when given."""
    from transformers import AutoConfig

    if isinstance(model, dict):
        cfg = dict(model.get("config") or {})
        if set(model) != {"config"} or "model_type" not in cfg:
            raise CptError('a model built from scratch is {"config": {"model_type": ..., ...}}', where="model")
        try:
            return AutoConfig.for_model(**cfg)
        except (ValueError, TypeError, KeyError) as e:
            raise CptError(f"cannot build a causal LM from this config: {first_line(e)}", where="model.config") from e
    try:
        return AutoConfig.from_pretrained(str(_local(model) or model), trust_remote_code=trust_remote_code,
                                          **_gguf(model, gguf_file))
    except CptError:
        raise
    except Exception as e:  # transformers reports a missing or broken checkpoint with many exception types
        raise _load_error(model, gguf_file, e) from e


def with_overrides(config: PretrainedConfig, overrides: ModelOverrides, where: str) -> PretrainedConfig:
    """A copy of ``config`` with a stage's overrides, checked by transformers' own RoPE validation.

    transformers 5 keeps every RoPE setting in ``config.rope_parameters`` (``rope_theta`` and
    ``rope_type`` with the type's keys), which the rotary embedding reads when it is built: so the
    overrides go there, before the weights load. A new scaling replaces the model's own one but
    keeps its base (and partial rotary factor); a new base keeps the model's scaling.
    """
    config = copy.deepcopy(config)
    if overrides.rope_theta is not None or overrides.rope_scaling is not None:
        config.rope_parameters = _rope_parameters(config, overrides, where)
    if overrides.max_position_embeddings is not None:
        if not hasattr(config, "max_position_embeddings"):
            raise CptError(f"{config.model_type} has no max_position_embeddings", where)
        config.max_position_embeddings = overrides.max_position_embeddings
    try:
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as e:  # what transformers raises for a RoPE block it refuses
        raise CptError(f"transformers refuses the RoPE settings: {first_line(e)}", where) from e
    return config


def _rope_parameters(config: PretrainedConfig, overrides: ModelOverrides, where: str) -> dict[str, Any]:
    current = getattr(config, "rope_parameters", None)
    if not isinstance(current, dict) or not current:
        raise CptError(f"{config.model_type} has no rotary position embedding (RoPE) settings to override", where)
    per_layer = config.nested_rope_parameter_keys(current)
    if per_layer:
        raise CptError(f"{config.model_type} sets RoPE per layer type ({', '.join(per_layer)}); "
                       "overrides set one for all layers and cannot express that", where)
    params = dict(current)
    if overrides.rope_scaling is not None:
        kept = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
        params = {**kept, **overrides.rope_scaling.rope_parameters()}
    if overrides.rope_theta is not None:
        params["rope_theta"] = overrides.rope_theta
    return params


def _local(model: str) -> Path | None:
    try:
        return local_dir(model, "model")
    except CptError as exc:
        raise CptError(f"cannot load {exc.message}", "model") from None


def _gguf(model: str, gguf_file: str | None) -> dict[str, str]:
    """transformers' keyword arguments that read ``model``'s GGUF file ``gguf_file``; none without one."""
    if gguf_file is None:
        return {}
    try:
        return {"gguf_file": gguf_path(model, gguf_file, "model.gguf_file")}
    except CptError as exc:
        raise CptError(f"cannot load {exc.message}", exc.where) from None


def _gguf_weights(model: str, gguf_file: str | None) -> dict[str, Any]:
    """:func:`_gguf`'s arguments for the weights, which must come dequantised: transformers would
    otherwise keep them in GGUF blocks (not trainable) wherever it has a kernel for them."""
    from transformers import GgufConfig

    gguf = _gguf(model, gguf_file)
    return {**gguf, "quantization_config": GgufConfig(dequantize=True)} if gguf else {}


def _drop_gguf_record(model: PreTrainedModel) -> None:
    """Forget that a dequantised model came from GGUF, so that it trains and exports as any other: an
    export that kept the loader's record (``quantization_config``) would be read back through it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _load_error(model: str, gguf_file: str | None, error: Exception) -> CptError:
    if gguf_file is None:
        return CptError(f"cannot load {model}: {first_line(error)}", "model")
    return CptError(f"cannot load {gguf_file} of {model}: {first_line(error)}", "model.gguf_file")


def build_model(
    model: str | dict[str, Any], *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
    partitioned: bool = False, config: PretrainedConfig | None = None, gguf_file: str | None = None,
) -> PreTrainedModel:
    """Load ``model`` (a local directory or hub id) or build it fresh from ``{"config": {...}}``, in ``dtype``.

    ``config``: the architecture to build instead of ``model``'s own (it with overrides,
    :func:`with_overrides`); the weights still come from ``model``.

    A fresh model is initialised from torch's global generator: seed it identically on every
    rank. ``partitioned``: build it as ZeRO-3 partitions (DeepSpeed's ``zero.Init``; the caller
    keeps a ``transformers.integrations.HfDeepSpeedConfig`` of the ZeRO-3 config alive), and
    read each rank's part of a local safetensors checkpoint only (:mod:`cpt.train.partitioned`).
    ``gguf_file``: read the weights from this GGUF file of ``model``, dequantised to ``dtype`` by
    transformers; it builds such models whole even under ZeRO-3 (outside ``zero.Init``), and
    DeepSpeed partitions them when the engine starts. The model is returned in training mode.
    """
    from transformers import AutoModelForCausalLM

    if config is None:
        config = model_config(model, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    if isinstance(model, dict):
        try:
            built = _fresh(config, dtype, trust_remote_code, partitioned)
        except (ValueError, TypeError, KeyError) as e:
            raise CptError(f"cannot build a causal LM from this config: {first_line(e)}", where="model.config") from e
        return built.train()
    local, gguf = _local(model), _gguf_weights(model, gguf_file)
    own_reads = partitioned and local and not gguf  # a GGUF file is not safetensors
    built = _load_partitioned(local, config, dtype, trust_remote_code) if own_reads else None
    if built is None:  # transformers' own loading (under ZeRO-3: rank 0 reads the checkpoint and scatters it)
        try:
            built = AutoModelForCausalLM.from_pretrained(str(local or model), config=config,
                                                         trust_remote_code=trust_remote_code, dtype=dtype, **gguf)
        except Exception as e:  # transformers reports a missing or broken checkpoint with many exception types
            raise _load_error(model, gguf_file, e) from e
        if gguf:
            _drop_gguf_record(built)
    return built.train()


def _fresh(config, dtype: torch.dtype, trust_remote_code: bool, partitioned: bool) -> PreTrainedModel:
    """A freshly initialised model, drawn the same way whether partitioned or not: built without
    initialisation, then initialised module by module (children first), as transformers does for
    ZeRO-3 (where rank 0 draws each module gathered). Every ZeRO stage starts from the same weights."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import guard_torch_init_functions, no_init_weights

    if partitioned:
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    with no_init_weights():
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    with torch.no_grad(), guard_torch_init_functions():
        built.initialize_weights()
    built.tie_weights()
    return built


def _load_partitioned(model_dir: Path, config, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel | None:
    """The checkpoint in ``model_dir`` as ZeRO-3 partitions, each rank reading its own; None when its
    files are not plain safetensors whose names match the architecture's."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    files = safetensors_files(model_dir)
    if not files:
        return None
    entries = read_index(files)
    with no_init_weights():  # the checkpoint overwrites every weight
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    names = match_names(built, entries)
    if names is None:
        return None
    load_partitions(built, entries, names)
    return built


def enable_activation_checkpointing(model: PreTrainedModel, where: str) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing (``torch.utils.checkpoint`` with ``use_reentrant=False``) gives the
    same loss and gradients as without, works when the block's inputs need no gradient, and
    composes with ZeRO-3's parameter gathering. The KV cache is off: it only serves generation.
    """
    if not model.supports_gradient_checkpointing:
        raise CptError(f"{type(model).__name__} does not support activation checkpointing", where)
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def set_attention(model: PreTrainedModel, implementation: str, where: str, asked: bool = True) -> None:
    """Run attention through transformers' ``implementation``; every one of them keeps packed
    documents apart when given position ids that restart at each document (document masking).

    A backend the recipe ``asked`` for and the model cannot use is an error; the default one is
    only preferred: a model without it (custom code) keeps its own.
    """
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError) as e:
        if not asked:
            log.warning("%s keeps its own attention (%s): %s", type(model).__name__,
                        getattr(model.config, "_attn_implementation", None), first_line(e))
            return
        raise CptError(f"cannot use attention {implementation!r} with {type(model).__name__}: {first_line(e)}",
                       where) from None


def compile_blocks(model: PreTrainedModel, where: str) -> None:
    """Compile each transformer block with ``torch.compile``, in place (parameter names unchanged).

    Blocks, not the whole model: every block of a model is the same code, so one compilation
    serves them all, and what runs around them (masks, the chunked loss head, DeepSpeed's hooks)
    stays eager. The blocks are the classes transformers keeps whole when it splits a model
    (``_no_split_modules``).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise CptError(f"{type(model).__name__} names no transformer block class to compile", where)
    for block in blocks:
        block.compile()


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model's vocabulary hold every token id, and its special ids match the tokenizer's.

    Embeddings only grow (models often carry padded vocabularies). A tokenizer without a padding
    token pads with its end-of-sequence token, which it is given so that saved copies agree.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    for cfg in (model.config, model.generation_config):
        if cfg is None:
            continue
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
