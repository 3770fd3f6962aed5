"""Shared building blocks of the typed recipe schema."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_length(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value < 0:
        raise ValueError("must be >= 0")
    if value >= 1 and value != int(value):
        raise ValueError("must be a whole number of steps when >= 1, or a fraction of the stage when < 1")
    return value


# A length in optimizer steps when >= 1, or a fraction of the stage's steps when < 1.
Length = Annotated[float, AfterValidator(_check_length)]


def resolve_length(value: float, total_steps: int) -> int:
    """Turn a :data:`Length` into whole steps of a stage with ``total_steps`` steps."""
    if value >= 1:
        return int(value)
    return int(round(value * total_steps))
