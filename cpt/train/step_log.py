"""A stage's training records: written on logging steps, the only steps that read values off the device."""

from __future__ import annotations

import time

from cpt.plan import StagePlan
from cpt.train.engine import StepEngine, StepResult
from cpt.train.metrics import MetricsLog
from cpt.train.prefetch import Prefetcher
from cpt.train.progress import Progress
from cpt.train.throughput import mfu, model_flops_per_token


class StepLog:
    """Writes a record on logging steps; throughput is measured over the steps since the last one.

    ``peak_flops`` is one process's peak FLOP/s (None: no ``mfu`` in the records).
    """

    def __init__(self, plan: StagePlan, metrics: MetricsLog, progress: Progress, engine: StepEngine,
                 peak_flops: float | None):
        self.plan, self.metrics, self.progress = plan, metrics, progress
        self.world_size = engine.world_size
        self.peak_flops = peak_flops
        self.flops_per_token = model_flops_per_token(engine.module, plan.stage.seq_len)
        self._seconds = 0.0
        self._steps = 0

    def due(self, done: int, result: StepResult) -> bool:
        return done % self.plan.stage.log_every == 0 or done == self.plan.steps or result.skipped

    def after_step(self, step: int, result: StepResult, engine: StepEngine, sampler: Prefetcher, seconds: float) -> None:
        """Called after step ``step`` (0-based), which took ``seconds`` of training time."""
        stage, done = self.plan.stage, step + 1
        self._seconds += seconds
        self._steps += 1
        if not self.due(done, result):
            self.progress.update(step, stage.tokens_per_step, None, result.lr)
            return
        realized = sampler.realized_blocks() * stage.seq_len
        domains = self.plan.domains
        waited = time.perf_counter()
        loss = result.loss  # waits for the device to finish the queued steps: their time counts too
        self._seconds += time.perf_counter() - waited
        tokens_per_s = self._steps * stage.tokens_per_step / max(self._seconds, 1e-9)
        self._seconds, self._steps = 0.0, 0
        self.metrics.write(
            {
                "step": step,
                "tokens": done * stage.tokens_per_step,
                "lr": result.lr,
                "loss": loss,
                "grad_norm": result.grad_norm,
                "skipped": engine.nonfinite,
                "tokens_per_s": tokens_per_s,
                **({} if self.peak_flops is None else
                   {"mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size)}),
                **{f"loss/{d}": loss for d, loss in zip(domains, result.group_losses) if loss is not None},
                **{f"tokens/{d}": int(n) for d, n in zip(domains, realized)},
            }
        )
        self.progress.update(step, stage.tokens_per_step, loss, result.lr)
