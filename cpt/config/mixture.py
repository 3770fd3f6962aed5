"""A stage's data mixture as the recipe writes it: weights, replay, temperature, phases."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, field_validator, model_validator

from cpt.config.schema import Strict


def _some_positive(weights: dict[str, float]) -> dict[str, float]:
    if not any(v > 0 for v in weights.values()):
        raise ValueError("at least one weight must be > 0")
    return weights


Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Weights = Annotated[dict[str, Weight], AfterValidator(_some_positive)]
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Replay = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class _Split(Strict):
    """How the tokens of a span of steps are split: shared by the whole stage and by a phase."""

    weights: Weights | None = Field(
        default=None,
        description="Relative weight per domain name, normalised to sum 1; domains not named get 0. Without replay "
        "they may name any domain defined so far, with replay only the stage's own. Excludes temperature; "
        "in a phase, setting either replaces the stage's choice.",
    )
    temperature: Temperature | None = Field(
        default=None,
        description="Weights proportional to `training_tokens ** temperature` over the stage's own domains: "
        "1 natural proportions, 0 uniform. Excludes weights; neither set: 1 (in a phase: the stage's choice).",
    )
    replay: Replay | None = Field(
        default=None,
        description="Share of the tokens (0 <= replay < 1) drawn from the previous stage's domains, in the "
        "proportions that stage planned; the rest follows weights or temperature. null: none "
        "(in a phase: the stage's replay).",
    )

    metadata: bool | None = Field(
        default=None,
        description="Whether documents of domains that define `metadata` are preceded by it (MeCo conditioning); "
        "false trains on their plain text, as in MeCo's cooldown. null: on (in a phase: the stage's choice).",
    )

    @model_validator(mode="after")
    def _one_shape(self):
        if self.weights is not None and self.temperature is not None:
            raise ValueError("set either weights or temperature, not both")
        return self


class Phase(_Split):
    """One span of a stage, ending at ``until`` (a fraction of the stage's steps)."""

    until: float = Field(
        gt=0,
        le=1,
        description="End of the phase as a fraction of the stage's steps: it covers the steps t with "
        "t / steps < until that no earlier phase covers.",
    )


class MixtureConfig(_Split):
    """A stage's mixture: static weights or a temperature, optional replay, optional phases."""

    phases: list[Phase] | None = Field(
        default=None,
        description="Spans of the stage with their own mixture (curricula, end-of-run upsampling), in order; "
        "their until values increase strictly and the last is 1. null: one mixture for the whole stage.",
    )

    @field_validator("phases")
    @classmethod
    def _ordered(cls, phases: list[Phase] | None) -> list[Phase] | None:
        if phases is None:
            return None
        if not phases:
            raise ValueError("give at least one phase, or leave phases out")
        ends = [p.until for p in phases]
        for before, after in zip(ends, ends[1:]):
            if after <= before:
                raise ValueError(f"phase ends (until) must be strictly increasing, got {before} then {after}")
        if ends[-1] != 1:
            raise ValueError(f"the last phase must end at until: 1, got {ends[-1]}")
        return phases
