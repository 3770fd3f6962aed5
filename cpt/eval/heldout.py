"""Held-out loss per domain: the number that says what a model learned and what it forgot.

Every domain of the recipe is measured, not only the ones a stage trains on, because forgetting
shows on the domains a stage does *not* target. The held-out split of a domain is disjoint from
its training split at the document level (see :mod:`cpt.data.selection`), packed like training
data, and capped to a fixed number of leading blocks so every evaluation reads the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from cpt.data.blocks import TokenBatch, read_rows
from cpt.data.pack import Packed, load_packed
from cpt.errors import CptError
from cpt.eval.lockstep import lockstep_sums
from cpt.train.head import ChunkedHead, causal_lm_loss


def heldout_sets(domains: Mapping, tokenizer, seq_len: int, seed: int, cache_dir, max_tokens: int) -> dict[str, Packed]:
    """The first ``max_tokens // seq_len`` held-out blocks of each domain (at least one block), in
    plain text: a domain's metadata conditions training only (MeCo), never what is measured.

    Domains without a held-out split (``heldout: 0``) are left out: there is nothing to measure
    them on. A held-out split shorter than one block is an error that names its domain.
    """
    n_blocks = max(1, max_tokens // seq_len)
    sets = {}
    for name, cfg in domains.items():
        if cfg.heldout == 0:
            continue
        try:
            packed = load_packed(cfg, "heldout", tokenizer, seq_len, seed, cache_dir)
        except CptError as exc:
            raise CptError(exc.message, f"data.{name}") from None
        sets[name] = replace(packed, tokens=packed.tokens[:n_blocks])
    return sets


def heldout_losses(
    model: torch.nn.Module,
    sets: Mapping[str, Packed],
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    document_masking: bool = False,
) -> dict[str, float]:
    """Mean next-token loss of ``model`` on each set, over every predicted token of every block,
    with the stage's document masking, computed as training computes it (:func:`causal_lm_loss`).

    With several ranks the batches are shared out by :func:`cpt.eval.lockstep.lockstep_sums`.
    """
    head = ChunkedHead.of(model)
    names = list(sets)
    batches = [
        (i, start, min(start + batch_size, len(sets[name])))
        for i, name in enumerate(names)
        for start in range(0, len(sets[name]), batch_size)
    ]

    def score(batch: tuple[int, int, int], sums: torch.Tensor) -> None:  # loss sums, then token counts
        i, start, stop = batch
        read = read_rows(sets[names[i]], np.arange(start, stop), document_masking)
        tokens = TokenBatch(*(torch.from_numpy(a) if a is not None else None for a in read))
        predicted = tokens.n_targets()
        loss, _ = causal_lm_loss(model, head, tokens.to(device), predicted)
        sums[i] += loss.double() * predicted
        sums[len(names) + i] += predicted

    totals = lockstep_sums(model, batches, score, (2 * len(names),), device, rank, world_size).tolist()
    return {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names)}


def perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of raising on a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
