"""The ``evaluation`` block of a stage: what is measured during training, and how often."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from cpt.eval.harness import HarnessConfig
from cpt.schema import Length, Strict


class EvaluationConfig(Strict):
    """Held-out loss of every recipe domain (and harness tasks) at the start of the stage, every
    ``every`` steps, and at its end. The defaults evaluate about ten times per stage."""

    enabled: bool = True
    every: Length = 0.1  # steps, or a fraction of the stage; 0: only at its start and end
    at_tokens: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)  # also when these many tokens of the stage are done
    max_tokens_per_domain: int = Field(default=16384, gt=0)  # leading held-out tokens read per domain
    batch_size: int | None = Field(default=None, gt=0)  # sequences per forward; default: the micro-batch size
    harness: HarnessConfig = Field(default_factory=HarnessConfig)
    # Domains the stage means to learn (adaptation, stability gap); every other domain counts
    # for forgetting. Default: the stage's own domains. Name them when the stage also defines
    # a stand-in for the base model's pre-training data, which is general data, not a target.
    targets: list[str] | None = None
