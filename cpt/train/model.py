"""The model a stage trains: any Hugging Face causal LM, from a checkpoint or from a config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cpt.errors import CptError, first_line
from cpt.paths import local_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def build_model(model: str | dict[str, Any], *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load ``model`` (a local directory or hub id) or build it fresh from ``{"config": {...}}``.

    A fresh model is initialised from torch's global generator: seed it identically on every
    rank. The model is returned in training mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model, dict):
        cfg = dict(model.get("config") or {})
        if set(model) != {"config"} or "model_type" not in cfg:
            raise CptError('a model built from scratch is {"config": {"model_type": ..., ...}}', where="model")
        try:
            config = AutoConfig.for_model(**cfg)
            built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        except (ValueError, TypeError, KeyError) as e:
            raise CptError(f"cannot build a causal LM from this config: {first_line(e)}", where="model.config") from e
    else:
        try:
            local = local_dir(model, "model")
        except CptError as exc:
            raise CptError(f"cannot load {exc.message}", "model") from None
        try:
            built = AutoModelForCausalLM.from_pretrained(
                str(local or model), trust_remote_code=trust_remote_code, dtype=dtype
            )
        except Exception as e:  # transformers reports a missing or broken checkpoint with many exception types
            raise CptError(f"cannot load {model}: {first_line(e)}", where="model") from e
    return built.train()


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
