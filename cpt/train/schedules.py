"""Learning-rate schedules for continual pre-training, as pure functions of the optimizer step.

Sources (formulas collected in REFERENCES.md §1):

- ``cosine``: re-warm and re-decay. Ibrahim et al. 2024, "Simple and Scalable Strategies to
  Continually Pre-train Large Language Models"; Gupta et al. 2023, "Continual Pre-Training of
  Large Language Models: How to (re)warm your model?".
- ``wsd``: warmup-stable-decay. Hu et al. 2024 (MiniCPM, exponential decay); Hägele et al. 2024,
  "Scaling Laws and Compute-Optimal Training beyond Fixed Training Durations" (1-sqrt decay).
  Numerically identical to ``transformers.get_wsd_schedule`` for the shapes the two share.
- ``infinite``: Ibrahim et al. 2024; Singh et al. 2025, "Beyond Cosine Decay".
- ``wsd-s``: Wen et al. 2024, "Understanding Warmup-Stable-Decay Learning Rates: A River Valley
  Loss Landscape Perspective".

Conventions. Step ``t = 0`` is the first optimizer step of a stage of ``steps`` steps; the value
at ``t`` is the lr that step uses. Lengths are :data:`cpt.config.schema.Length` resolved against the stage
(the ``wsd-s`` decay against its period) by :func:`cpt.config.schedule.validate_schedule`.

- Every linear warmup is REFERENCES' and transformers' ``peak * t / W`` for ``t < W``: it starts
  at 0 (``wsd`` and ``wsd-s``: at ``lr * min_lr_ratio``) and reaches the peak at ``t = W``.
- ``wsd`` and ``wsd-s`` follow transformers exactly: the decay covers the last ``D`` steps with
  progress ``(t - start) / D``, so its floor ``lr * min_lr_ratio`` is met one step after the
  window, at ``t = steps``. The ``infinite`` anneal does the same, being REFERENCES' formula
  with ``T_end = steps``.
- ``cosine`` meets its floor exactly at the last step ``steps - 1``.
- Past the stage (``t >= steps``, e.g. a scheduler stepped once after the last update) every
  schedule holds the value its last phase arrives at.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from cpt.config.schedule import (
    ConstantSchedule,
    CosineSchedule,
    InfiniteSchedule,
    Lengths,
    ScheduleConfig,
    WSDSchedule,
    WSDSSchedule,
    validate_schedule,
)

# Falling shapes, 1 at p = 0 and 0 at p = 1. A rising warmup is the same shape run backwards,
# f(1 - p): linear p, cosine (1 - cos(pi p)) / 2, 1-sqrt 1 - sqrt(1 - p), as in transformers.
_FALL: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


class _Plan(NamedTuple):
    """A schedule resolved against a stage: lr per step, and the steps that end a decay."""

    lr: Callable[[int], float]
    decay_ends: list[int]


def _fall(shape: str, p: float, hi: float, lo: float) -> float:
    """Go from ``hi`` at p = 0 to ``lo`` at p = 1, both exactly; ``exp`` interpolates geometrically."""
    if shape == "exp":
        return hi * (lo / hi) ** p
    f = _FALL[shape](p)
    return hi * f + lo * (1.0 - f)


def _progress(done: int, length: int) -> float:
    """Share of a phase of ``length`` steps that is done; 1 past its end and for an empty phase."""
    return min(done / length, 1.0) if length > 0 else 1.0


def _ramp(t: int, warmup: int, peak: float) -> float:
    """The linear warmup shared by every schedule (REFERENCES §1, transformers): 0 at t = 0."""
    return peak * t / warmup


def _constant(cfg: ConstantSchedule, n: Lengths, steps: int) -> _Plan:
    return _Plan(lambda t: _ramp(t, n.warmup, cfg.lr) if t < n.warmup else cfg.lr, [])


def _cosine(cfg: CosineSchedule, n: Lengths, steps: int) -> _Plan:
    def lr(t: int) -> float:
        if t < n.warmup:
            return _ramp(t, n.warmup, cfg.lr)
        return _fall("cosine", _progress(t - n.warmup, steps - 1 - n.warmup), cfg.lr, cfg.floor)

    return _Plan(lr, [steps])


def _wsd_factor(cfg: WSDSchedule | WSDSSchedule, t: int, warmup: int, decay_start: int, decay: int) -> float:
    """lr / cfg.lr at step t of one warmup-stable-decay run: the lambda of transformers' WSD."""
    if t < warmup:
        return _fall(cfg.warmup_type, 1.0 - t / warmup, 1.0, cfg.min_lr_ratio)
    if t < decay_start:
        return 1.0
    return _fall(cfg.decay_type, _progress(t - decay_start, decay), 1.0, cfg.min_lr_ratio)


def _wsd(cfg: WSDSchedule, n: Lengths, steps: int) -> _Plan:
    return _Plan(lambda t: cfg.lr * _wsd_factor(cfg, t, n.warmup, steps - n.decay, n.decay), [steps] if n.decay else [])


def _wsds(cfg: WSDSSchedule, n: Lengths, steps: int) -> _Plan:
    ends = [n.period * k for k in range(1, steps // n.period)] + [steps]
    starts = [0] + ends[:-1]

    def lr(t: int) -> float:
        k = min(bisect_right(ends, t), len(ends) - 1)
        start, end = starts[k], ends[k]
        return cfg.lr * _wsd_factor(cfg, t - start, n.warmup if k == 0 else 0, end - start - n.decay, n.decay)

    return _Plan(lr, ends)


def _inv_sqrt_cooldown(cfg: InfiniteSchedule, p: float) -> float:
    def h(x: float) -> float:
        return 1.0 / math.sqrt(1.0 + cfg.timescale * x) - 1.0

    return cfg.lr + (cfg.const_lr - cfg.lr) * h(p) / h(1.0)


def _infinite(cfg: InfiniteSchedule, n: Lengths, steps: int) -> _Plan:
    w, c, a = n.warmup, n.cooldown, n.anneal
    t_cd, t_ann = w + c, steps - a

    def lr(t: int) -> float:
        if a and t >= t_ann:
            return _fall(cfg.anneal_type, _progress(t - t_ann, a), cfg.const_lr, cfg.min_lr)
        if t < w:
            return _ramp(t, w, cfg.lr if c else cfg.const_lr)
        if t < t_cd:
            p = (t - w) / c
            if cfg.cooldown_type == "cosine":
                return _fall("cosine", p, cfg.lr, cfg.const_lr)
            return _inv_sqrt_cooldown(cfg, p)
        return cfg.const_lr

    return _Plan(lr, [steps] if a else [])


_BUILDERS: dict[str, Callable[..., _Plan]] = {
    "constant": _constant,
    "cosine": _cosine,
    "wsd": _wsd,
    "infinite": _infinite,
    "wsd-s": _wsds,
}


def _plan(cfg: ScheduleConfig, steps: int) -> _Plan:
    return _BUILDERS[cfg.type](cfg, validate_schedule(cfg, steps), steps)


def lr_at(cfg: ScheduleConfig, step: int, steps: int) -> float:
    """The lr of optimizer step ``step`` (0-based) of a stage of ``steps`` steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return _plan(cfg, steps).lr(step)


def lr_curve(cfg: ScheduleConfig, steps: int) -> np.ndarray:
    """``[lr_at(cfg, t, steps) for t in range(steps)]`` as float64, validating once."""
    lr = _plan(cfg, steps).lr
    return np.fromiter(map(lr, range(steps)), dtype=np.float64, count=steps)


def decay_ends(cfg: ScheduleConfig, steps: int) -> list[int]:
    """Step counts after which the weights have just finished a decay: release checkpoints.

    A value ``n`` means the checkpoint taken once ``n`` optimizer steps are done (the last decayed
    step was ``t = n - 1``). ``wsd-s``: the end of every period, the last being ``steps``;
    ``cosine``, ``wsd`` with a decay and ``infinite`` with an anneal: ``[steps]``; otherwise ``[]``.
    """
    return list(_plan(cfg, steps).decay_ends)
