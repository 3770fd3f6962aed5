"""Held-out loss per domain: the number that says what a model learned and what it forgot.

Every domain of the recipe is measured, not only the ones a stage trains on, because forgetting
shows on the domains a stage does *not* target. The held-out split of a domain is disjoint from
its training split at the document level (see :mod:`cpt.data.sources`), packed like training
data, and capped to a fixed number of leading blocks so every evaluation reads the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from cpt.data.pack import load_blocks
from cpt.errors import CptError


def heldout_sets(domains: Mapping, tokenizer, seq_len: int, seed: int, cache_dir, max_tokens: int) -> dict[str, np.ndarray]:
    """The first ``max_tokens // seq_len`` held-out blocks of each domain (at least one block).

    Domains without a held-out split (``heldout: 0``) are left out: there is nothing to measure
    them on. A held-out split shorter than one block is an error that names its domain.
    """
    n_blocks = max(1, max_tokens // seq_len)
    sets = {}
    for name, cfg in domains.items():
        if cfg.heldout == 0:
            continue
        try:
            blocks = load_blocks(cfg, "heldout", tokenizer, seq_len, seed, cache_dir)
        except CptError as exc:
            raise CptError(exc.message, f"data.{name}") from None
        sets[name] = blocks[:n_blocks]
    return sets


def heldout_losses(
    model: torch.nn.Module,
    sets: Mapping[str, np.ndarray],
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Mean next-token loss of ``model`` on each set, over every predicted token of every block.

    Blocks are dealt to ranks round-robin and the sums are all-reduced. Every rank runs the same
    number of forward passes (a rank short of blocks repeats one and ignores the result) because
    a ZeRO-3 forward gathers weights collectively: a rank that stopped early would hang the rest.
    """
    names = list(sets)
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=device)  # loss sums, then token counts
    was_training = model.training
    model.eval()
    try:
        with no_grad_for(model):
            for i, name in enumerate(names):
                blocks = sets[name]
                mine = np.arange(rank, len(blocks), world_size)
                per_rank = math.ceil(len(blocks) / world_size)
                for start in range(0, per_rank, batch_size):
                    rows = mine[start : start + batch_size]
                    real = len(rows)
                    if real == 0:  # keep step with the other ranks
                        rows = np.zeros(1, dtype=np.int64)
                    ids = torch.from_numpy(np.asarray(blocks[rows], dtype=np.int64)).to(device)
                    loss = model(input_ids=ids, labels=ids).loss.double()
                    if real:
                        predicted = real * (ids.shape[1] - 1)
                        sums[i] += loss * predicted
                        sums[len(names) + i] += predicted
    finally:
        model.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    totals = sums.tolist()
    return {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names)}


def no_grad_for(model: torch.nn.Module):
    """Inference mode, except for a ZeRO-3 model: its parameter gathering writes to tensors that
    must stay usable by the training step after, which inference tensors are not."""
    partitioned = any(hasattr(p, "ds_tensor") for p in model.parameters())
    return torch.no_grad() if partitioned else torch.inference_mode()


def perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of raising on a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
