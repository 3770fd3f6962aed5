"""Learning-rate schedule configs, and the check that their lengths fit a stage.

Schema only: the lr of each step is computed in :mod:`cpt.train.schedules`, which documents the
conventions. Nothing here imports torch, transformers or deepspeed, so ``cpt validate`` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

from pydantic import Field, model_validator

from cpt.config.schema import Length, Strict, resolve_length
from cpt.errors import CptError

Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Floor = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Shape = Literal["linear", "cosine", "1-sqrt"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exp"]


class Lengths(NamedTuple):
    """A schedule's lengths in whole steps, resolved against its stage; 0 for those it lacks."""

    warmup: int = 0
    decay: int = 0
    period: int = 0
    cooldown: int = 0
    anneal: int = 0


def _check_fit(total: int, what: str, *phases: tuple[str, int]) -> None:
    """Phases laid end to end must fit in ``total`` steps; blame the first one that overflows."""
    used = 0
    for i, (name, length) in enumerate(phases):
        used += length
        if used > total:
            parts = " + ".join(f"{n} ({k})" for n, k in phases[: i + 1])
            raise CptError(f"{parts} steps exceed the {what} ({total} steps)", f"schedule.{name}")


class ConstantSchedule(Strict):
    """Linear warmup to ``lr``, then ``lr`` (the CMR-law setup: warmup, then constant)."""

    type: Literal["constant"] = Field(default="constant", description="Selects this schedule.")
    lr: Rate = Field(description="The learning rate once the warmup is over.")
    warmup: Length = Field(
        default=0.0,
        description="Linear warmup length: at step t < warmup the lr is `lr * t / warmup`, as in transformers. "
        "Steps when >= 1, a fraction of the stage's steps when < 1.",
    )

    def lengths(self, steps: int) -> Lengths:
        w = resolve_length(self.warmup, steps)
        _check_fit(steps, "stage", ("warmup", w))
        return Lengths(warmup=w)


class CosineSchedule(Strict):
    """Re-warm to ``lr`` (about 1% of the stage), then cosine to ``min_lr`` at the last step."""

    type: Literal["cosine"] = Field(default="cosine", description="Selects this schedule.")
    lr: Rate = Field(description="Peak learning rate, reached at the end of the warmup.")
    warmup: Length = Field(
        default=0.01,
        description="Linear re-warm length: at step t < warmup the lr is `lr * t / warmup`, as in transformers. "
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

    def lengths(self, steps: int) -> Lengths:
        w = resolve_length(self.warmup, steps)
        if w >= steps:
            raise CptError(f"warmup ({w} steps) leaves no step of the {steps}-step stage to decay", "schedule.warmup")
        return Lengths(warmup=w)


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

    def lengths(self, steps: int) -> Lengths:
        w, d = resolve_length(self.warmup, steps), resolve_length(self.decay, steps)
        _check_fit(steps, "stage", ("warmup", w), ("decay", d))
        return Lengths(warmup=w, decay=d)


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

    def lengths(self, steps: int) -> Lengths:
        period = resolve_length(self.period, steps)
        if period < 1:
            raise CptError(f"period ({self.period}) is less than one step of the {steps}-step stage", "schedule.period")
        _check_fit(steps, "stage", ("period", period))
        w, d = resolve_length(self.warmup, steps), resolve_length(self.decay, period)
        if d < 1:
            raise CptError(f"decay ({self.decay}) is less than one step of the {period}-step period", "schedule.decay")
        _check_fit(period, "first period", ("warmup", w), ("decay", d))
        return Lengths(warmup=w, decay=d, period=period)


class InfiniteSchedule(Strict):
    """Warmup to ``lr``, cooldown to ``const_lr``, constant, then an anneal to ``min_lr``.

    Phases in steps, as in REFERENCES §1: warmup ``[0, T_w)`` rising as ``lr * t / T_w``, cooldown
    ``[T_w, T_cd)`` from ``lr`` at ``T_w`` to ``const_lr`` exactly at ``T_cd``, constant ``[T_cd,
    T_ann)``, anneal ``[T_ann, steps)`` with progress ``(t - T_ann) / (T_end - T_ann)`` and
    ``T_end = steps``; ``T_w = warmup``, ``T_cd = warmup + cooldown``, ``T_ann = steps - anneal``.
    So the anneal, like transformers' WSD decay, meets ``min_lr`` one step after the stage, and a
    one-step anneal keeps ``const_lr`` in the stage. Without a cooldown the warmup climbs to
    ``const_lr`` instead, and without warmup and cooldown the stage starts at ``const_lr`` (a later
    task continuing the constant branch). ``anneal = 0`` stays on the constant branch. The defaults
    are the authors': warmup 5%, cooldown to 15%, anneal over the last 20%.
    """

    type: Literal["infinite"] = Field(default="infinite", description="Selects this schedule.")
    lr: Rate = Field(description="Peak learning rate: the warmup's target and the cooldown's start.")
    const_lr: Rate = Field(
        description="The constant learning rate, reached at the end of the cooldown and held until the anneal; "
        "at most lr."
    )
    min_lr: Floor = Field(
        description="Where the anneal ends, at step `steps` (one past the stage's last, as transformers' WSD decay); "
        "at most const_lr, and > 0 for an exp anneal."
    )
    warmup: Length = Field(
        default=0.05,
        description="Linear warmup length, to lr (to const_lr without a cooldown): at step t < warmup the lr is "
        "`peak * t / warmup`. Steps when >= 1, a fraction of the stage's steps when < 1.",
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

    def lengths(self, steps: int) -> Lengths:
        w, c, a = (resolve_length(x, steps) for x in (self.warmup, self.cooldown, self.anneal))
        _check_fit(steps, "stage", ("warmup", w), ("cooldown", c), ("anneal", a))
        return Lengths(warmup=w, cooldown=c, anneal=a)


ScheduleConfig = Annotated[
    ConstantSchedule | CosineSchedule | WSDSchedule | InfiniteSchedule | WSDSSchedule,
    Field(discriminator="type"),
]


def validate_schedule(cfg: ScheduleConfig, steps: int) -> Lengths:
    """The schedule's lengths for a stage of ``steps`` steps.

    Raises :class:`CptError` (``where="schedule.<field>"``) if they do not fit the stage.
    """
    if steps < 1:
        raise ValueError(f"a stage has at least one step, got steps={steps}")
    return cfg.lengths(steps)
