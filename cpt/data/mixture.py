"""Domain weights as a function of training progress: the mixture schedule of one stage.

A stage's ``mixture`` decides, for every optimizer step, which share of the batch each domain
gets. The result is a matrix W of shape (steps, domains) whose rows sum to 1; the sampler turns
it into batches that follow it to within one block per domain.

Semantics
- Nothing set: natural proportions (``temperature: 1``) over the stage's own domains.
- ``weights``: relative weights, normalised to sum 1; domains not named get 0. Without replay
  they may name any domain known so far (the stage's own plus every earlier stage's), which
  writes a replay mixture out by hand.
- ``temperature: alpha``: weights proportional to ``train_tokens ** alpha`` over the stage's
  own domains (1: natural proportions, 0: uniform, between: flattened). Domains without
  training tokens get no weight. ``weights`` and ``temperature`` exclude each other.
- ``replay: r`` (0 <= r < 1): a share r of the tokens comes from the previous stage's domains,
  split in proportion to the tokens that stage planned for each, and 1 - r from the stage's own
  domains split by ``weights``/``temperature``; ``weights`` may then name own domains only.
- ``phases``: at step t of a stage of S steps the progress is p = t / S, and the active phase is
  the first whose ``until`` exceeds p. A phase that sets ``weights`` or ``temperature`` replaces
  the top-level choice of both; its unset ``replay`` inherits the top-level one. Phases express
  curricula and end-of-run upsampling of small high-quality domains (Blakeney et al. 2024).
  A phase's ``metadata: false`` trains domains that define metadata on their plain text (the
  cooldown of MeCo, Gao et al. 2025); :func:`metadata_steps` gives the flag per step.
- ``max_epochs`` (per domain, applied by :func:`cap_epochs`): a domain planned for more than
  ``cap * available`` blocks is scaled down to exactly that, uniformly over its steps, and the
  freed share goes to the uncapped domains of the same steps in proportion to their weights;
  repeated until no domain exceeds its cap. Steps whose every weighted domain is capped keep
  their weights, so the cap is met in the other steps; where that is impossible it is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cpt.config.mixture import MixtureConfig
from cpt.errors import CptError


def weight_matrix(
    cfg: MixtureConfig,
    steps: int,
    own_domains: Sequence[str],
    known_domains: Sequence[str],
    train_tokens: Mapping[str, int],
    replay_shares: Mapping[str, float] | None,
) -> tuple[list[str], np.ndarray]:
    """Domain names (own first, then others with weight) and W (steps, D), rows summing to 1.

    ``train_tokens`` holds the training tokens of each own domain (for temperatures);
    ``replay_shares`` the previous stage's planned tokens per domain (None for a first stage).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    known_domains = list(dict.fromkeys([*own_domains, *known_domains]))
    spans = [(None, cfg)] if cfg.phases is None else list(enumerate(cfg.phases))
    parts = [
        _span_parts(cfg, i, span, own_domains, known_domains, train_tokens, replay_shares) for i, span in spans
    ]
    used = {d for part in parts for d, v in part.items() if v > 0}
    others = dict.fromkeys([*known_domains, *(replay_shares or {})])
    names = list(own_domains) + [d for d in others if d in used and d not in own_domains]
    rows = np.array([[part.get(d, 0.0) for d in names] for part in parts], dtype=np.float64)
    rows /= rows.sum(axis=1, keepdims=True)
    if cfg.phases is None:
        return names, np.repeat(rows, steps, axis=0)
    return names, rows[_active_phase(cfg, steps)]


def metadata_steps(cfg: MixtureConfig, steps: int) -> np.ndarray:
    """(steps,) bool: whether domains with metadata are trained with it at each step (MeCo phases)."""
    stage = cfg.metadata is not False
    if cfg.phases is None:
        return np.full(steps, stage)
    flags = np.array([stage if p.metadata is None else p.metadata for p in cfg.phases])
    return flags[_active_phase(cfg, steps)]


def _active_phase(cfg: MixtureConfig, steps: int) -> np.ndarray:
    """Index of the phase that covers each step."""
    ends = np.array([p.until for p in cfg.phases])
    return np.searchsorted(ends, np.arange(steps) / steps, side="right")


def _span_parts(cfg, index, span, own, known, train_tokens, replay_shares) -> dict[str, float]:
    """Weights of one phase (or the whole stage when ``index`` is None) as domain -> share."""
    prefix = "mixture" if index is None else f"mixture.phases.{index}"
    shaped = span.weights is not None or span.temperature is not None
    source, where = (span, prefix) if shaped else (cfg, "mixture")
    replay = span.replay if span.replay is not None else cfg.replay
    replay_where = f"{prefix}.replay" if span.replay is not None else "mixture.replay"
    replay = replay or 0.0

    if source.weights is not None:
        allowed = own if replay > 0 else known
        for name in source.weights:
            if name not in known:
                raise CptError(f"unknown domain '{name}'; known domains: {', '.join(known)}", where=f"{where}.weights")
            if name not in allowed:
                raise CptError(
                    f"'{name}' is not one of this stage's domains ({', '.join(own)}); with replay set, weights "
                    "name only the stage's own domains and replay covers the earlier ones",
                    where=f"{where}.weights",
                )
        share = _normalised(dict(source.weights))
    else:
        alpha = 1.0 if source.temperature is None else source.temperature
        missing = [d for d in own if d not in train_tokens]
        if missing:
            raise ValueError(f"train_tokens lacks the stage's domains {missing}")
        share = {d: float(train_tokens[d]) ** alpha if train_tokens[d] > 0 else 0.0 for d in own}
        if sum(share.values()) <= 0:
            raise CptError("the stage's domains have no training tokens", where=f"{where}.temperature")
        share = _normalised(share)

    if replay == 0:
        return share
    previous = {d: float(v) for d, v in (replay_shares or {}).items() if v > 0}
    if not previous:
        raise CptError("replay needs an earlier stage with planned tokens to replay from", where=replay_where)
    out = {d: (1 - replay) * v for d, v in share.items()}
    for d, v in _normalised(previous).items():
        out[d] = out.get(d, 0.0) + replay * v
    return out


def _normalised(values: dict[str, float]) -> dict[str, float]:
    total = sum(values.values())
    return {k: v / total for k, v in values.items()}


def planned_blocks(W: np.ndarray, batch_blocks: int) -> np.ndarray:
    """Blocks each domain is planned to supply over the stage (float: the sampler rounds)."""
    return batch_blocks * np.asarray(W, dtype=np.float64).sum(axis=0)


def epochs(W: np.ndarray, batch_blocks: int, available_blocks: Mapping[str, int]) -> dict[str, float]:
    """How often each domain's training blocks are repeated: planned / available blocks.

    ``available_blocks`` names W's columns in order.
    """
    planned = planned_blocks(W, batch_blocks)
    return {
        name: float(p / n) if n > 0 else (math.inf if p > 0 else 0.0)
        for (name, n), p in zip(_columns(W, available_blocks), planned)
    }


def cap_epochs(
    W: np.ndarray, batch_blocks: int, available_blocks: Mapping[str, int], max_epochs: Mapping[str, float]
) -> np.ndarray:
    """W with every domain held to ``max_epochs[d] * available_blocks[d]`` planned blocks.

    ``available_blocks`` names W's columns in order; domains absent from ``max_epochs`` are
    uncapped. A domain with weight but no training blocks is an error either way.
    """
    columns = _columns(W, available_blocks)
    names = [name for name, _ in columns]
    W = np.array(W, dtype=np.float64)
    planned = planned_blocks(W, batch_blocks)
    for (name, n), p in zip(columns, planned):
        if p > 0 and n <= 0:
            raise CptError(f"domain '{name}' has weight but no training blocks", where="mixture")
    cap = np.array([max_epochs[name] * n if name in max_epochs else math.inf for name, n in columns])
    capped = np.zeros(len(names), dtype=bool)
    while True:
        over = ~capped & (planned > cap * (1 + 1e-9) + 1e-9)
        if not over.any():
            return W
        capped |= over
        free_weight = W[:, ~capped].sum(axis=1)
        open_rows = free_weight > 1e-12  # a row whose uncapped share is nil cannot take more
        if not open_rows.any():
            needed = batch_blocks * W.shape[0]
            allowed = cap[planned > 0].sum()
            raise CptError(
                f"stage needs {needed} blocks but max_epochs of its domains allow only {allowed:.0f}", where="mixture"
            )
        for d in np.flatnonzero(over):
            fixed = batch_blocks * W[~open_rows, d].sum()
            movable = batch_blocks * W[open_rows, d].sum()
            if fixed > cap[d]:
                raise CptError(
                    f"domain '{names[d]}' must supply {fixed:.0f} blocks in steps where every weighted domain is "
                    f"capped, but max_epochs allows only {cap[d]:.0f}",
                    where="mixture",
                )
            W[open_rows, d] *= (cap[d] - fixed) / movable
        rows = W[open_rows]
        freed = 1 - rows.sum(axis=1)
        rows[:, ~capped] *= (1 + freed / free_weight[open_rows])[:, None]
        W[open_rows] = rows
        planned = planned_blocks(W, batch_blocks)


def _columns(W: np.ndarray, available_blocks: Mapping[str, int]) -> list[tuple[str, int]]:
    if len(available_blocks) != np.shape(W)[1]:
        raise ValueError(f"available_blocks names {len(available_blocks)} domains for {np.shape(W)[1]} columns")
    return list(available_blocks.items())
