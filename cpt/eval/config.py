"""The ``evaluation`` block of a stage: what is measured during training, and how often."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from cpt.eval.harness import HarnessConfig
from cpt.schema import Length, Strict


class EvaluationConfig(Strict):
    """Held-out loss of every recipe domain (and harness tasks) at the start of the stage, every
    ``every`` steps, and at its end. The defaults evaluate about ten times per stage."""

    enabled: bool = Field(
        default=True, description="Evaluate during the stage; false: no evaluation and no summary.json."
    )
    every: Length = Field(
        default=0.1,
        description="Evaluate at every multiple of this many optimizer steps (a fraction of the stage's steps when < 1); "
        "0: only at the stage's start and end.",
    )
    at_tokens: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list,
        description="Also evaluate once these many tokens of the stage are done (rounded up to a whole step).",
    )
    max_tokens_per_domain: int = Field(
        default=16384,
        gt=0,
        description="Held-out tokens scored per domain: its first `max_tokens_per_domain // seq_len` blocks "
        "(at least one).",
    )
    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Sequences per forward pass of the held-out evaluation; null: batch.micro_batch_size.",
    )
    harness: HarnessConfig = Field(
        default_factory=HarnessConfig, description="lm-evaluation-harness tasks scored along with the held-out loss."
    )
    targets: list[str] | None = Field(
        default=None,
        description="Domains the stage means to learn (adaptation, stability gap); every other domain counts for "
        "forgetting. null: the stage's own domains. Name them when the stage also defines a stand-in for the "
        "base model's pre-training data, which is general data, not a target.",
    )
