"""The ``evaluation`` block of a stage: what is measured during training, and how often.

Schema and the task-name checks `cpt validate` runs, apart from the evaluation code itself
(:mod:`cpt.eval`), so that checking a recipe imports neither torch nor lm-eval. Names in
lm-eval's own registry are checked when a run resolves its tasks, before training
(:func:`cpt.eval.tasks.resolve_tasks`): that needs lm-eval's task index, seconds to build.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from cpt.config.schema import Length, Strict
from cpt.errors import CptError

if TYPE_CHECKING:
    from cpt.config.data import DomainConfig

NEXTLINE = "cpt_nextline"  # the offline next-line tasks, one per domain (cpt.eval.nextline)
YAML_SUFFIXES = (".yaml", ".yml")
TASKS_FIELD = "evaluation.harness.tasks"  # where errors about a task name point


def nextline_task(domain: str) -> str:
    return f"{NEXTLINE}_{domain}"


class HarnessConfig(Strict):
    """lm-evaluation-harness tasks run on the base model, every ``every`` steps, and at each stage end."""

    tasks: list[str] = Field(
        default_factory=lambda: [NEXTLINE],
        description="cpt_nextline (an offline next-line task for every domain with held-out documents), "
        "`cpt_nextline_<domain>`, the path of a task YAML, or a name in lm-eval's registry; []: no harness.",
    )
    every: int | None = Field(
        default=None,
        gt=0,
        description="Also run the tasks at every multiple of this many optimizer steps (the held-out loss is "
        "measured with them); null: only at the stage's start and end.",
    )
    limit: int | None = Field(
        default=100,
        gt=0,
        description="Examples scored per task, and the number built for each cpt_nextline task; null: all of them.",
    )
    batch_size: int = Field(default=16, gt=0, description="Requests scored per forward pass.")
    num_fewshot: int = Field(
        default=0,
        ge=0,
        description="Solved examples shown before each question; a task whose own config pins 0 stays zero-shot.",
    )


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


def task_problem(name: str, domains: Mapping[str, DomainConfig]) -> str | None:
    """What is wrong with a task name, as far as can be told without lm-eval: a next-line task of
    an unknown domain or of one without held-out documents, or a task YAML that does not exist."""
    if name.startswith(f"{NEXTLINE}_"):
        domain = name.removeprefix(f"{NEXTLINE}_")
        if domain not in domains:
            known = ", ".join(nextline_task(d) for d in domains) or "none"
            return f"unknown harness task {name!r}: the recipe has no domain {domain!r} (known: {known})"
        if domains[domain].heldout == 0:
            return f"harness task {name!r} needs held-out documents, but data.{domain} has heldout: 0"
    elif name.lower().endswith(YAML_SUFFIXES) and not Path(name).expanduser().is_file():
        return f"harness task file {name} does not exist"
    return None


def generation_unsupported(name: str) -> CptError:
    """The error for a generative task: training scores log-likelihoods, it does not generate."""
    return CptError(
        f"harness task {name!r} generates text, which the in-training harness does not do; "
        "keep loglikelihood and multiple-choice tasks here and run generative ones on the exported "
        "checkpoint with lm-eval's own hf model",
        TASKS_FIELD,
    )
