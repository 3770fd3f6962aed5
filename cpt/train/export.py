"""Hugging Face model directories from a live engine or from a checkpoint on disk.

The result loads offline with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``: ``config.json``, safetensors weights, generation config and
tokenizer files. It is written into a temporary sibling and renamed into place, so an export is
either complete or absent. Weights keep the training precision: a bf16 run exports bf16 weights,
whether from the live engine or (rounded from the fp32 master weights) from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cpt import dist
from cpt.errors import CptError
from cpt.io import library_io_errors, staged_dir
from cpt.train.checkpoint import read_meta
from cpt.train.engine import import_deepspeed

if TYPE_CHECKING:
    from transformers import (
        GenerationConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

    from cpt.train.engine import StepEngine


def gather_state_dict(trainer: StepEngine) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of the weights and persistent buffers on rank 0, None on other ranks.

    Collective. Under ZeRO-3 the shards are gathered one weight at a time, so no rank ever holds
    more than one whole weight beyond its shards (rank 0 keeps the CPU copies).
    """
    deepspeed = import_deepspeed()
    module, main = trainer.module, trainer.rank == 0
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=trainer.zero_stage == 3):
            if main:
                state[name] = p.detach().to("cpu", copy=True)
    if not main:
        return None
    buffers = dict(module.named_buffers())
    state.update({k: buffers[k].detach().to("cpu", copy=True) for k in module.state_dict(keep_vars=True) if k in buffers})
    return state


def export_hf(trainer: StepEngine, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Write the live model as a Hugging Face directory (every rank calls this; rank 0 writes)."""
    if not trainer.weights_finite():
        raise CptError(f"not exporting to {out_dir}: the model has non-finite weights", where="export")
    state = gather_state_dict(trainer)
    if state is not None:
        module = trainer.module
        write_hf(module.config, state, tokenizer, Path(out_dir), generation_config=module.generation_config)
    dist.barrier()


def export_checkpoint(ckpt_dir: Path, out_dir: Path, *, trust_remote_code: bool = False) -> None:
    """Convert a checkpoint written by :func:`cpt.train.checkpoint.save` (any ZeRO stage) alone.

    Needs no engine and no process group: ZeRO shards are merged by DeepSpeed's zero_to_fp32.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    hf = ckpt_dir / "hf"
    missing = [name for name in ("hf/config.json", meta["tag"]) if not (ckpt_dir / name).exists()]
    if missing:  # a checkpoint copied in part: say so before any weights are read
        raise CptError(f"{ckpt_dir} is not a complete cpt checkpoint: no {' and no '.join(missing)}", "export")
    config = AutoConfig.from_pretrained(hf, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(hf, trust_remote_code=trust_remote_code)
    generation = GenerationConfig.from_pretrained(hf) if (hf / "generation_config.json").exists() else None
    dtype = torch.bfloat16 if meta["precision"] == "bf16" else torch.float32
    state = {k: v.to(dtype) for k, v in _checkpoint_state_dict(ckpt_dir, meta["tag"], meta["zero_stage"]).items()}
    write_hf(config, state, tokenizer, Path(out_dir), generation_config=generation, trust_remote_code=trust_remote_code)


def _checkpoint_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage > 0:
        zero_to_fp32 = import_deepspeed().utils.zero_to_fp32
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # Without ZeRO, DeepSpeed keeps the whole module state dict in the model-states file.
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return states["module"]


def write_hf(
    config: PretrainedConfig,
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    generation_config: GenerationConfig | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Save ``state`` as a model of ``config`` plus ``tokenizer`` into ``out_dir``, atomically."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CptError(f"not exporting to {out_dir}: non-finite weights in {', '.join(bad[:3])}", where="export")
    model = _model_from_state_dict(config, state, trust_remote_code)
    if generation_config is not None:  # the base model's sampling defaults, not ones derived from its config
        model.generation_config = generation_config
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp, library_io_errors(out_dir):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _model_from_state_dict(config: PretrainedConfig, state: dict[str, torch.Tensor], trust_remote_code: bool) -> PreTrainedModel:
    """A model that owns ``state``'s tensors, built on the meta device so that no memory is spent twice."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied output embeddings come back as an alias of the input ones
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing or result.unexpected_keys:
        raise CptError(
            f"the weights do not fit the model config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}",
            where="export",
        )
    model.config.dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    return model.eval()
