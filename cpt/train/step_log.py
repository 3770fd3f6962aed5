"""A stage's training records: written on logging steps, the only steps that read values off the device."""

from __future__ import annotations

from cpt.data.sampler import MixtureSampler
from cpt.plan import StagePlan
from cpt.train.engine import StepEngine, StepResult
from cpt.train.metrics import MetricsLog
from cpt.train.progress import Progress


class StepLog:
    def __init__(self, plan: StagePlan, metrics: MetricsLog, progress: Progress):
        self.plan, self.metrics, self.progress = plan, metrics, progress

    def due(self, done: int, result: StepResult) -> bool:
        return done % self.plan.stage.log_every == 0 or done == self.plan.steps or result.skipped

    def after_step(self, step: int, result: StepResult, engine: StepEngine, sampler: MixtureSampler) -> None:
        stage, done = self.plan.stage, step + 1
        if not self.due(done, result):
            self.progress.update(step, stage.tokens_per_step, None, result.lr)
            return
        realized = sampler.realized_blocks() * stage.seq_len
        domains = self.plan.domains
        self.metrics.write(
            {
                "step": step,
                "tokens": done * stage.tokens_per_step,
                "lr": result.lr,
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "skipped": engine.nonfinite,
                **{f"loss/{d}": loss for d, loss in zip(domains, result.group_losses) if loss is not None},
                **{f"tokens/{d}": int(n) for d, n in zip(domains, realized)},
            }
        )
        self.progress.update(step, stage.tokens_per_step, result.loss, result.lr)
