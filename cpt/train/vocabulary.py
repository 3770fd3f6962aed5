"""Grow a model's embeddings for an extended tokenizer (:mod:`cpt.data.extension`).

Old rows are left untouched, so on text of old tokens the grown model computes the same logits
over the old vocabulary as before. A new row starts as the mean of the rows of its pieces
under the base tokenizer (``init: mean``, as in fast vocabulary transfer, Gee et al. 2022): the
token starts out meaning roughly what the sequence of its pieces meant, and near the other
rows in scale, so its logit neither dominates the softmax nor vanishes. ``init: random`` draws
from the model's own initialisation, normal(0, initializer_range). An untied output layer gets
its own rows the same way (from its own rows); a tied one is the input embedding.

Under ZeRO-3 the embeddings are partitions: they are gathered, rank 0 writes the new rows, and
DeepSpeed scatters them again (``GatheredParameters(modifier_rank=0)``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from cpt.data.extension import Extension

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def grow_embeddings(model: PreTrainedModel, extension: Extension) -> None:
    """Make room for the extension's ids and initialise their rows (input and untied output)."""
    if extension.size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(extension.size, mean_resizing=False)  # its rows are overwritten below
    tensors = _embedding_tensors(model)
    std = model.config.get_text_config().initializer_range if extension.init == "random" else 0.0
    partitioned = any(hasattr(t, "ds_id") for t in tensors)
    with _gathered(tensors) if partitioned else nullcontext():
        if not partitioned or torch.distributed.get_rank() == 0:
            with torch.no_grad():
                for tensor in tensors:
                    init_rows(tensor, extension, std)


def _embedding_tensors(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The input embedding, and an untied output layer's weight and bias where it has them."""
    inputs = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is inputs:
        return [inputs]
    bias = getattr(output, "bias", None)
    return [inputs, output.weight] + ([bias] if bias is not None else [])


def _gathered(tensors: list[torch.nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(tensors, modifier_rank=0)


def init_rows(tensor: torch.Tensor, extension: Extension, std: float) -> None:
    """Set the extension's rows of ``tensor`` (a weight, or a bias: one value per row), in place.

    A bias row is the mean of its pieces' biases too, or zero under ``random``.
    """
    ids = torch.tensor(extension.ids, device=tensor.device)
    if extension.init == "random":
        if tensor.dim() == 1:
            tensor[ids] = 0
        else:
            tensor[ids] = (torch.randn(len(ids), tensor.shape[1]) * std).to(tensor.device, tensor.dtype)
        return
    means = [tensor[pieces].float().mean(0) for pieces in extension.pieces]
    tensor[ids] = torch.stack(means).to(tensor.dtype)
