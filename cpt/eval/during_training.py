"""Evaluation during a stage: one record per evaluation, deltas against the stage's base model.

The first evaluation (step 0) measures the starting model before any update: it is the base
every later ``delta/<domain>`` is taken against, so every delta is exactly 0 there. On resume the
base is read back from the stage's ``metrics.jsonl``. Every rank takes part (held-out blocks and
the harness's forward passes are sharded over ranks); rank 0 writes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from cpt.config.schema import resolve_length
from cpt.eval.heldout import heldout_losses, heldout_sets, perplexity
from cpt.eval.tasks import resolve_tasks, run_harness
from cpt.train.ema import Ema
from cpt.train.metrics import eval_records, read_metrics


class StageEvaluator:
    def __init__(self, recipe, plan, rank: int, world_size: int):
        stage = plan.stage
        self.cfg = stage.evaluation
        self.steps = plan.steps
        self.tokens_per_step = stage.tokens_per_step
        self.tokenizer = plan.tokenizer
        self.rank, self.world_size = rank, world_size
        self.batch_size = self.cfg.batch_size or stage.batch.micro_batch_size
        self.document_masking = stage.document_masking
        cache = recipe.resolved_cache_dir()
        self.sets = heldout_sets(
            recipe.domains(), plan.tokenizer, stage.seq_len, recipe.seed, cache / "blocks", self.cfg.max_tokens_per_domain
        )
        self.every = resolve_length(self.cfg.every, plan.steps)
        self.at_steps = {math.ceil(t / self.tokens_per_step) for t in self.cfg.at_tokens}
        harness = self.cfg.harness
        self.tasks = (
            resolve_tasks(harness.tasks, recipe.domains(), recipe.seed, cache / "harness", harness.limit)
            if harness.tasks else None
        )
        self.base: dict[str, float] = {}

    def due(self, done: int) -> bool:
        held_out = done in (0, self.steps) or done in self.at_steps or bool(self.every and done % self.every == 0)
        return held_out or self.harness_due(done)

    def harness_due(self, done: int) -> bool:
        every = self.cfg.harness.every
        return self.tasks is not None and (done in (0, self.steps) or bool(every and done % every == 0))

    def restore_base(self, metrics_path: Path) -> None:
        """Take the base values from the step-0 record of an interrupted run being resumed."""
        if not metrics_path.is_file():
            return
        first = next((r for r in eval_records(read_metrics(metrics_path)) if r["step"] == 0), None)
        if first is not None:
            self.base = {k: float(v) for k, v in first.items() if _is_score(k)}

    def evaluate(self, model, device, done: int, ema: Ema | None = None) -> dict[str, Any]:
        """Collective: every rank calls it at the same step; all get the same record."""
        started = time.perf_counter()
        record: dict[str, Any] = {"kind": "eval", "step": done, "tokens": done * self.tokens_per_step}
        heldout_seconds = 0.0
        for prefix, weights in [("", nullcontext())] + ([("ema/", ema.applied())] if ema is not None else []):
            with weights:
                t0 = time.perf_counter()
                losses = heldout_losses(model, self.sets, self.batch_size, device, self.rank, self.world_size,
                                        self.document_masking)
                heldout_seconds += time.perf_counter() - t0
                for name, loss in losses.items():
                    record[f"{prefix}eval/{name}/loss"] = loss
                    record[f"{prefix}eval/{name}/ppl"] = perplexity(loss)
                if self.harness_due(done):
                    harness = self.cfg.harness
                    results = run_harness(
                        model, self.tokenizer, self.tasks, device=device, limit=harness.limit,
                        batch_size=harness.batch_size, num_fewshot=harness.num_fewshot, rank=self.rank,
                        world_size=self.world_size, document_masking=self.document_masking,
                    )
                    for task, metrics in results.items():
                        record.update({f"{prefix}harness/{task}/{m}": v for m, v in metrics.items()})
        if done == 0:
            self.base = {k: v for k, v in record.items() if _is_score(k)}
        for key in [k for k in record if k.endswith("/loss") and k in self.base]:
            prefix, name = key.removesuffix("/loss").rsplit("eval/", 1)
            record[f"{prefix}delta/{name}"] = record[key] - self.base[key]
        tokens = sum(len(packed) * packed.seq_len for packed in self.sets.values()) * (2 if ema is not None else 1)
        record["eval/tokens"] = tokens
        record["eval/heldout_seconds"] = heldout_seconds
        record["eval/tokens_per_s"] = tokens / heldout_seconds if heldout_seconds else None
        record["eval/seconds"] = time.perf_counter() - started
        return record


def _is_score(key: str) -> bool:
    return key.endswith("/loss") or "harness/" in key
