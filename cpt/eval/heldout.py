"""Held-out loss per domain: the number that says what a model learned and what it forgot.

Every domain of the recipe is measured, not only the ones a stage trains on, because forgetting
shows on the domains a stage does *not* target. The held-out split of a domain is disjoint from
its training split at the document level (see :mod:`cpt.data.splits`), packed like training
data, and capped to a fixed number of leading blocks so every evaluation reads the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from cpt.data.pack import load_blocks
from cpt.errors import CptError
from cpt.eval.lockstep import lockstep_sums


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

    With several ranks the batches are shared out by :func:`cpt.eval.lockstep.lockstep_sums`.
    """
    names = list(sets)
    batches = [
        (i, start, min(start + batch_size, len(sets[name])))
        for i, name in enumerate(names)
        for start in range(0, len(sets[name]), batch_size)
    ]

    def score(batch: tuple[int, int, int], sums: torch.Tensor) -> None:  # loss sums, then token counts
        i, start, stop = batch
        ids = torch.from_numpy(np.asarray(sets[names[i]][start:stop], dtype=np.int64)).to(device)
        predicted = ids.shape[0] * (ids.shape[1] - 1)
        sums[i] += model(input_ids=ids, labels=ids).loss.double() * predicted
        sums[len(names) + i] += predicted

    totals = lockstep_sums(model, batches, score, (2 * len(names),), device, rank, world_size).tolist()
    return {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names)}


def perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of raising on a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
