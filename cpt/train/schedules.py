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
at ``t`` is the lr that step uses. Lengths are :data:`cpt.schema.Length` resolved against the stage
(the ``wsd-s`` decay against its period).

- The linear warmups of ``constant``, ``cosine`` and ``infinite`` run ``peak * (t + 1) / (W + 1)``
  for ``t < W``: the first step already learns, and the peak is reached at ``t = W``.
- ``wsd`` and ``wsd-s`` follow transformers exactly: the warmup starts at ``lr * min_lr_ratio``
  at ``t = 0``; the decay covers the last ``D`` steps with progress ``(t - start) / D``, so its
  floor ``lr * min_lr_ratio`` is met one step after the window, at ``t = steps``.
- ``cosine`` and the ``infinite`` anneal meet their floor exactly at the last step ``steps - 1``.
- Past the stage (``t >= steps``, e.g. a scheduler stepped once after the last update) every
  schedule holds the value its last phase arrives at.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import numpy as np
from pydantic import Field, model_validator

from cpt.errors import CptError
from cpt.schema import Length, Strict, resolve_length

Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Floor = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Shape = Literal["linear", "cosine", "1-sqrt"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exp"]

# Falling shapes, 1 at p = 0 and 0 at p = 1. A rising warmup is the same shape run backwards,
# f(1 - p): linear p, cosine (1 - cos(pi p)) / 2, 1-sqrt 1 - sqrt(1 - p), as in transformers.
_FALL: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


class ConstantSchedule(Strict):
    """Linear warmup to ``lr``, then ``lr`` (the CMR-law setup: warmup, then constant)."""

    type: Literal["constant"] = Field(default="constant", description="Selects this schedule.")
    lr: Rate = Field(description="The learning rate once the warmup is over.")
    warmup: Length = Field(
        default=0.0,
        description="Linear warmup length: at step t < warmup the lr is `lr * (t + 1) / (warmup + 1)`. "
        "Steps when >= 1, a fraction of the stage's steps when < 1.",
    )


class CosineSchedule(Strict):
    """Re-warm to ``lr`` (about 1% of the stage), then cosine to ``min_lr`` at the last step."""

    type: Literal["cosine"] = Field(default="cosine", description="Selects this schedule.")
    lr: Rate = Field(description="Peak learning rate, reached at the end of the warmup.")
    warmup: Length = Field(
        default=0.01,
        description="Linear re-warm length: at step t < warmup the lr is `lr * (t + 1) / (warmup + 1)`. "
        "Steps when >= 1, a fraction of the stage's steps when < 1; it must leave at least one step to decay.",
    )
    min_lr: Floor | None = Field(
        default=None,
        description="The floor the cosine reaches at the stage's last step, at most lr; null: `0.1 * lr` "
        "(Ibrahim et al.'s floor).",
    )

    @model_validator(mode="after")
    def _floor_below_peak(self) -> CosineSchedule:
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    @property
    def floor(self) -> float:
        return 0.1 * self.lr if self.min_lr is None else self.min_lr


class _WarmupStableDecay(Strict):
    """Fields shared by ``wsd`` and ``wsd-s``.

    ``exp`` decays geometrically, ``lr * min_lr_ratio ** p`` with ``p = (t - start) / decay``:
    MiniCPM's exponential decay, whose half-life is ``decay * ln 2 / ln(1 / min_lr_ratio)`` steps.
    The other shapes are rescaled as in transformers, ``min_lr_ratio + (1 - min_lr_ratio) * f``.
    """

    lr: Rate = Field(description="Peak learning rate: held from the end of the warmup until a decay starts.")
    warmup: Length = Field(
        default=0.0,
        description="Warmup length, from `lr * min_lr_ratio` at step 0 up to lr (wsd-s: in its first period only). "
        "Steps when >= 1, a fraction of the stage's steps when < 1.",
    )
    decay: Length = Field(
        default=0.2,
        description="Decay length, down to `lr * min_lr_ratio`: wsd decays over the stage's last steps, wsd-s at "
        "the end of every period. Steps when >= 1; when < 1 a fraction of the stage (wsd) or of the period (wsd-s).",
    )
    warmup_type: Shape = Field(
        default="linear", description="Shape of the warmup: linear, cosine or 1-sqrt (each decay shape run backwards)."
    )
    decay_type: DecayShape = Field(
        default="1-sqrt",
        description="Shape of the decay: linear, cosine, 1-sqrt, or exp (geometric; needs min_lr_ratio > 0).",
    )
    min_lr_ratio: Ratio = Field(
        default=0.0,
        description="The floor as a fraction of lr: where the warmup starts and every decay ends.",
    )

    @model_validator(mode="after")
    def _exp_needs_floor(self) -> _WarmupStableDecay:
        if self.decay_type == "exp" and self.min_lr_ratio <= 0:
            raise ValueError("decay_type 'exp' needs min_lr_ratio > 0 (an exponential never reaches 0)")
        return self


class WSDSchedule(_WarmupStableDecay):
    """Warmup, stable at ``lr``, decay over the last ``decay`` of the stage."""

    type: Literal["wsd"] = Field(default="wsd", description="Selects this schedule.")


class WSDSSchedule(_WarmupStableDecay):
    """WSD-S: one main branch of periods, each stable then decaying, the next restarting at ``lr``.

    Periods tile the stage from step 0, so decayed checkpoints fall at multiples of ``period``;
    the warmup sits at the start of the first period; a remainder of the stage shorter than a
    period lengthens the last one, so the stage ends decayed. ``decay`` is a number of steps, or a
    fraction of ``period`` when < 1.
    """

    type: Literal["wsd-s"] = Field(default="wsd-s", description="Selects this schedule.")
    period: Length = Field(
        description="Length of each stable-then-decay period, tiled from step 0; the stage's remainder lengthens "
        "the last period. Steps when >= 1, a fraction of the stage's steps when < 1."
    )

    @model_validator(mode="after")
    def _period_positive(self) -> WSDSSchedule:
        if self.period <= 0:
            raise ValueError("period must be > 0")
        return self


class InfiniteSchedule(Strict):
    """Warmup to ``lr``, cooldown to ``const_lr``, constant, then an anneal to ``min_lr``.

    Phases in steps: warmup ``[0, T_w)``, cooldown ``[T_w, T_cd)`` starting at ``lr``, constant
    ``[T_cd, T_ann)``, anneal ``[T_ann, steps)`` from ``const_lr`` at ``T_ann`` to ``min_lr`` at the
    last step; ``T_w = warmup``, ``T_cd = warmup + cooldown``, ``T_ann = steps - anneal``. So lr is
    ``lr`` at ``T_w`` and ``const_lr`` exactly at ``T_cd``, as in the papers' formulas. Without a
    cooldown the warmup climbs to ``const_lr`` instead, and without warmup and cooldown the stage
    starts at ``const_lr`` (a later task continuing the constant branch). ``anneal = 0`` stays on
    the constant branch; a one-step anneal is ``min_lr`` at the last step. The defaults are the
    authors': warmup 5%, cooldown to 15%, anneal over the last 20%.
    """

    type: Literal["infinite"] = Field(default="infinite", description="Selects this schedule.")
    lr: Rate = Field(description="Peak learning rate: the warmup's target and the cooldown's start.")
    const_lr: Rate = Field(
        description="The constant learning rate, reached at the end of the cooldown and held until the anneal; "
        "at most lr."
    )
    min_lr: Floor = Field(
        description="Where the anneal ends, at the stage's last step; at most const_lr, and > 0 for an exp anneal."
    )
    warmup: Length = Field(
        default=0.05,
        description="Linear warmup length, to lr (to const_lr without a cooldown): at step t < warmup the lr is "
        "`peak * (t + 1) / (warmup + 1)`. Steps when >= 1, a fraction of the stage's steps when < 1.",
    )
    cooldown: Length = Field(
        default=0.1,
        description="Length of the fall from lr to const_lr right after the warmup; 0: none. "
        "Steps when >= 1, a fraction of the stage's steps when < 1.",
    )
    cooldown_type: Literal["cosine", "inv-sqrt"] = Field(
        default="cosine",
        description="Shape of the cooldown: cosine, or inv-sqrt (`1 / sqrt(1 + timescale * p)`, rescaled to end "
        "at const_lr).",
    )
    timescale: Rate = Field(
        default=10.0,
        description="Steepness of the inv-sqrt cooldown: the larger, the more of the fall happens early. "
        "Unused by a cosine cooldown.",
    )
    anneal: Length = Field(
        default=0.2,
        description="Length of the final fall from const_lr to min_lr over the stage's last steps; 0: stay constant "
        "to the end. Steps when >= 1, a fraction of the stage's steps when < 1.",
    )
    anneal_type: Literal["exp", "linear", "1-sqrt"] = Field(
        default="exp",
        description="Shape of the anneal: exp (geometric; needs min_lr > 0), linear or 1-sqrt.",
    )

    @model_validator(mode="after")
    def _ordered_levels(self) -> InfiniteSchedule:
        if self.const_lr > self.lr:
            raise ValueError(f"const_lr ({self.const_lr}) must not exceed lr ({self.lr})")
        if self.min_lr > self.const_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed const_lr ({self.const_lr})")
        if self.anneal_type == "exp" and self.min_lr <= 0:
            raise ValueError("anneal_type 'exp' needs min_lr > 0 (an exponential never reaches 0)")
        return self


ScheduleConfig = Annotated[
    ConstantSchedule | CosineSchedule | WSDSchedule | InfiniteSchedule | WSDSSchedule,
    Field(discriminator="type"),
]


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
    return peak * (t + 1) / (warmup + 1)


def _check_fit(total: int, what: str, *phases: tuple[str, int]) -> None:
    """Phases laid end to end must fit in ``total`` steps; blame the first one that overflows."""
    used = 0
    for i, (name, length) in enumerate(phases):
        used += length
        if used > total:
            parts = " + ".join(f"{n} ({k})" for n, k in phases[: i + 1])
            raise CptError(f"{parts} steps exceed the {what} ({total} steps)", f"schedule.{name}")


def _constant(cfg: ConstantSchedule, steps: int) -> _Plan:
    w = resolve_length(cfg.warmup, steps)
    _check_fit(steps, "stage", ("warmup", w))
    return _Plan(lambda t: _ramp(t, w, cfg.lr) if t < w else cfg.lr, [])


def _cosine(cfg: CosineSchedule, steps: int) -> _Plan:
    w = resolve_length(cfg.warmup, steps)
    if w >= steps:
        raise CptError(f"warmup ({w} steps) leaves no step of the {steps}-step stage to decay", "schedule.warmup")

    def lr(t: int) -> float:
        if t < w:
            return _ramp(t, w, cfg.lr)
        return _fall("cosine", _progress(t - w, steps - 1 - w), cfg.lr, cfg.floor)

    return _Plan(lr, [steps])


def _wsd_factor(cfg: _WarmupStableDecay, t: int, warmup: int, decay_start: int, decay: int) -> float:
    """lr / cfg.lr at step t of one warmup-stable-decay run: the lambda of transformers' WSD."""
    if t < warmup:
        return _fall(cfg.warmup_type, 1.0 - t / warmup, 1.0, cfg.min_lr_ratio)
    if t < decay_start:
        return 1.0
    return _fall(cfg.decay_type, _progress(t - decay_start, decay), 1.0, cfg.min_lr_ratio)


def _wsd(cfg: WSDSchedule, steps: int) -> _Plan:
    w, d = resolve_length(cfg.warmup, steps), resolve_length(cfg.decay, steps)
    _check_fit(steps, "stage", ("warmup", w), ("decay", d))
    return _Plan(lambda t: cfg.lr * _wsd_factor(cfg, t, w, steps - d, d), [steps] if d else [])


def _wsds(cfg: WSDSSchedule, steps: int) -> _Plan:
    period = resolve_length(cfg.period, steps)
    if period < 1:
        raise CptError(f"period ({cfg.period}) is less than one step of the {steps}-step stage", "schedule.period")
    _check_fit(steps, "stage", ("period", period))
    w, d = resolve_length(cfg.warmup, steps), resolve_length(cfg.decay, period)
    if d < 1:
        raise CptError(f"decay ({cfg.decay}) is less than one step of the {period}-step period", "schedule.decay")
    _check_fit(period, "first period", ("warmup", w), ("decay", d))
    ends = [period * k for k in range(1, steps // period)] + [steps]
    starts = [0] + ends[:-1]

    def lr(t: int) -> float:
        k = min(bisect_right(ends, t), len(ends) - 1)
        start, end = starts[k], ends[k]
        return cfg.lr * _wsd_factor(cfg, t - start, w if k == 0 else 0, end - start - d, d)

    return _Plan(lr, ends)


def _inv_sqrt_cooldown(cfg: InfiniteSchedule, p: float) -> float:
    def h(x: float) -> float:
        return 1.0 / math.sqrt(1.0 + cfg.timescale * x) - 1.0

    return cfg.lr + (cfg.const_lr - cfg.lr) * h(p) / h(1.0)


def _infinite(cfg: InfiniteSchedule, steps: int) -> _Plan:
    w, c, a = (resolve_length(x, steps) for x in (cfg.warmup, cfg.cooldown, cfg.anneal))
    _check_fit(steps, "stage", ("warmup", w), ("cooldown", c), ("anneal", a))
    t_cd, t_ann = w + c, steps - a

    def lr(t: int) -> float:
        if a and t >= t_ann:
            return _fall(cfg.anneal_type, _progress(t - t_ann, a - 1), cfg.const_lr, cfg.min_lr)
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
    if steps < 1:
        raise ValueError(f"a stage has at least one step, got steps={steps}")
    return _BUILDERS[cfg.type](cfg, steps)


def validate_schedule(cfg: ScheduleConfig, steps: int) -> None:
    """Raise :class:`CptError` (``where="schedule.<field>"``) if the lengths do not fit the stage."""
    _plan(cfg, steps)


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
