"""Forward passes shared out over ranks in lockstep: how held-out loss and harness scoring shard.

A ZeRO-3 forward gathers every layer's weights with a collective, so all ranks must make the
same number of forward passes, or the ranks still waiting hang; the partial results are then
summed in one reduction on the engine's device, the only device NCCL takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from cpt import dist

Batch = TypeVar("Batch")


def lockstep_sums(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    score: Callable[[Batch, torch.Tensor], None],
    shape: tuple[int, ...],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """The sum over all ranks of what ``score(batch, totals)`` adds into ``totals`` for every batch.

    ``score`` runs ``model`` on one batch and adds its results into ``totals`` (float64, of
    ``shape``, on ``device``). Batches are dealt to ranks round-robin; a rank left without one in
    the last round scores ``batches[0]`` into a scratch tensor that is dropped, so that every rank
    calls ``score`` equally often. Meanwhile the model is in eval mode without gradients; its
    train/eval mode is restored after. Every rank gets the same totals.
    """
    totals = torch.zeros(shape, dtype=torch.float64, device=device)
    scratch = torch.zeros_like(totals)
    was_training = model.training
    model.eval()
    try:
        with _no_grad_for(model):
            for turn in range(math.ceil(len(batches) / world_size)):
                index = turn * world_size + rank
                if index < len(batches):
                    score(batches[index], totals)
                else:  # keep step with the other ranks
                    score(batches[0], scratch)
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
    return totals


def _no_grad_for(model: torch.nn.Module):
    """Inference mode, except for a ZeRO-3 model: its parameter gathering writes to tensors that
    must stay usable by the training step after, which inference tensors are not."""
    partitioned = any(hasattr(p, "ds_tensor") for p in model.parameters())
    return torch.no_grad() if partitioned else torch.inference_mode()
