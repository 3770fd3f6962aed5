"""When a stage saves and restores, and in which order.

A release (the end of a WSD-S decay, an anneal) is exported before the checkpoint that marks its
step done: a kill between the two resumes from the previous checkpoint and exports it again,
where the other order would resume past the release and never write it. A checkpoint pins the
data it indexes (each domain's cache fingerprint and block count), so resuming on other data is
refused instead of continuing on other blocks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cpt.errors import CptError
from cpt.plan import StagePlan
from cpt.train import checkpoint
from cpt.train.ema import Ema
from cpt.train.engine import StepEngine
from cpt.train.export import export_hf
from cpt.train.prefetch import Prefetcher
from cpt.train.schedules import decay_ends


@dataclass(frozen=True)
class Fork:
    """Start a stage from another run's checkpoint: its weights, optimizer and data position."""

    checkpoint: Path
    domains: list[str]  # the checkpointed run's domain order, to map its sampler counts by name


@dataclass(frozen=True)
class Restored:
    """Where a stage starts: its step, its sampler's state and offsets, and the checkpoint read."""

    step: int = 0
    sampler: dict[str, Any] | None = None
    offsets: list[int] | None = None
    source: Path | None = None  # the checkpoint whose per-rank tensors (the EMA) continue here


def restore(engine: StepEngine, plan: StagePlan, root: Path, resume: bool, fork: Fork | None) -> Restored:
    """Load the stage's latest checkpoint (``resume``) or the fork's, checking the data they index."""
    latest = checkpoint.latest(root) if resume else None
    if latest is not None:
        check_data(checkpoint.read_meta(latest).get("data"), plan, latest, set(plan.domains))
        state = checkpoint.load(engine, latest)
        return Restored(int(state["step"]), state["sampler"], state.get("offsets"), latest)
    if fork is None:
        return Restored()
    check_data(checkpoint.read_meta(fork.checkpoint).get("data"), plan, fork.checkpoint,
               set(plan.domains) & set(fork.domains))
    parent = checkpoint.load(engine, fork.checkpoint)
    counts = dict(zip(fork.domains, parent["sampler"]["counts"]))
    engine.load_state_dict({"updates": 0, "nonfinite": 0})
    return Restored(offsets=[counts.get(d, 0) for d in plan.domains], source=fork.checkpoint)


def check_data(saved: dict[str, dict] | None, plan: StagePlan, where: Path, domains: set[str]) -> None:
    """Refuse to continue a checkpoint's data position on data other than the one it indexes."""
    if saved is None:
        raise CptError("the checkpoint does not record the data it was trained on; start the stage anew", str(where))
    current = plan.data_pins()
    for name in sorted(key for key in current if key.split("/")[0] in domains):
        was, now = saved.get(name), current[name]
        if was is None:
            raise CptError(f"data.{name}: not part of the checkpointed run", str(where))
        if was != now:
            raise CptError(
                f"data.{name}: the data changed since the checkpoint (fingerprint {was['fingerprint']}, "
                f"{was['blocks']} blocks; now {now['fingerprint']}, {now['blocks']} blocks); restore the data "
                "or start a new run",
                str(where),
            )


class Checkpointer:
    """Saves a stage after the steps that need it: every ``checkpoint.every``, at releases, at the
    end and on a stop request; exports each release first."""

    def __init__(
        self, engine: StepEngine, plan: StagePlan, stage_dir: Path, sampler: Prefetcher, restored: Restored,
        ema: Ema | None, exported: Callable[[], AbstractContextManager],
    ):
        self.engine, self.plan, self.sampler, self.ema, self.exported = engine, plan, sampler, ema, exported
        self.root = stage_dir / "checkpoints"
        self.releases = stage_dir / "releases"
        self.offsets = restored.offsets
        self.release_steps = set(decay_ends(plan.stage.schedule, plan.steps)) - {plan.steps}

    def due(self, done: int, stopping: bool) -> bool:
        every = self.plan.stage.checkpoint.every
        return done == self.plan.steps or stopping or bool(every and done % every == 0) or done in self.release_steps

    def after_step(self, done: int, stopping: bool) -> None:
        if done in self.release_steps:
            with self.exported():
                export_hf(self.engine, self.plan.tokenizer, self.releases / f"step-{done}")
        if self.due(done, stopping):
            client = {"step": done, "sampler": self.sampler.state_dict(), "offsets": self.offsets}
            checkpoint.save(
                self.engine, self.root, done, client, tokenizer=self.plan.tokenizer, keep=self.plan.stage.checkpoint.keep,
                rank_tensors=self.ema.state_dict() if self.ema is not None else None, data=self.plan.data_pins(),
            )
