"""`cpt run`: train every stage of a recipe in order, resumably.

Run directory::

    <output_dir>/recipe.yaml                 the resolved recipe (the single source of truth)
    <output_dir>/<stage>/metrics.jsonl       one record per logged step (``step`` is 0-based)
    <output_dir>/<stage>/checkpoints/step-N  after N completed steps (DeepSpeed format + data state)
    <output_dir>/<stage>/final/              Hugging Face model directory: the stage is done

A stage starts from its ``model`` or the previous stage's ``final/`` with a fresh optimizer and
schedule (re-warm); ``--resume`` skips finished stages and continues the unfinished one from its
latest complete checkpoint with everything restored, so the continuation is exact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpt.data.sampler import MixtureSampler
from cpt.data.tokenizer import check_tokenizer_matches
from cpt.errors import CptError
from cpt.eval.during_training import StageEvaluator
from cpt.eval.summary import stage_summary
from cpt.plan import StagePlan, plan_recipe
from cpt.recipe import Recipe, dump_recipe
from cpt.train import checkpoint
from cpt.train.ema import Ema
from cpt.train.engine import build_engine, init_distributed
from cpt.train.export import export_hf
from cpt.train.launch import distributed_context, needs_launch, relaunch_under_deepspeed
from cpt.train.metrics import MetricsLog, jsonable, read_metrics
from cpt.train.model import build_model, resize_for_tokenizer
from cpt.train.progress import Progress
from cpt.train.schedules import decay_ends, lr_at

PREPARED_ENV = "CPT_RUN_PREPARED"  # set by the parent for processes it launches: the directory is ready


@dataclass
class RunOptions:
    output_dir: Path
    resume: bool = False
    overwrite: bool = False
    argv: tuple[str, ...] = ()  # the command's arguments, to tell the user how to resume


def prepare_output_dir(recipe: Recipe, opts: RunOptions) -> None:
    """Claim the run directory: never clobber one without --resume or --overwrite."""
    out = opts.output_dir
    text = dump_recipe(recipe)
    saved = out / "recipe.yaml"
    if out.exists() and any(out.iterdir()):
        if opts.resume and saved.is_file():
            if saved.read_text() != text:
                raise CptError(
                    f"the recipe differs from the one this run was started with ({saved}); resume with the same "
                    "recipe and --set overrides, or start a new run with another --output-dir",
                    "output_dir",
                )
            return
        if opts.overwrite:
            shutil.rmtree(out)
        elif opts.resume:
            raise CptError(f"{out} is not a cpt run directory (no recipe.yaml); nothing to resume", "output_dir")
        else:
            raise CptError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it", "output_dir")
    out.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    os.replace(tmp, saved)


class StopRequest:
    """SIGTERM / SIGINT ask the run to finish its step, checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.requested = True

    def agreed(self, world_size: int) -> bool:
        """Whether any rank was asked to stop: every rank must stop at the same step."""
        if world_size == 1:
            return self.requested
        flag = torch.tensor(int(self.requested))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(recipe: Recipe, opts: RunOptions, argv: list[str]) -> int:
    """Prepare the directory and data once, then train here or in the processes the recipe asks for."""
    ctx = distributed_context()
    if not ctx.launched:
        prepare_output_dir(recipe, opts)
        plans = plan_recipe(recipe)  # tokenizes once, before any worker starts
        if needs_launch(recipe.distributed):
            os.environ[PREPARED_ENV] = "1"
            return relaunch_under_deepspeed(argv, recipe.distributed)
        return train(recipe, plans, opts)
    init_distributed()
    if os.environ.get(PREPARED_ENV) != "1":  # started by an outside launcher: rank 0 claims the directory
        problem = [None]
        if ctx.is_main:
            try:
                prepare_output_dir(recipe, opts)
            except CptError as exc:
                problem = [exc]
        torch.distributed.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise problem[0]
    if not ctx.is_main:
        torch.distributed.barrier()  # rank 0 fills the data cache first
    plans = plan_recipe(recipe)
    if ctx.is_main:
        torch.distributed.barrier()
    return train(recipe, plans, opts)


def train(recipe: Recipe, plans: list[StagePlan], opts: RunOptions) -> int:
    """Train every unfinished stage; return the process exit code."""
    init_distributed()
    ctx = distributed_context()
    stop = StopRequest()
    try:
        start_model: str | dict | None = None
        for index, plan in enumerate(plans):
            stage = plan.stage
            if stage.model is not None:
                start_model = stage.model.path or {"config": stage.model.config}
            elif isinstance(start_model, str):
                check_tokenizer_matches(start_model, plan.tokenizer, f"stages.{stage.name}.tokenizer")
            stage_dir = opts.output_dir / stage.name
            final = stage_dir / "final"
            if not (final / "config.json").is_file():
                finished = train_stage(recipe, plan, index, start_model, stage_dir, opts.resume, stop)
                if not finished:
                    if ctx.is_main:
                        print(
                            f"stopped after a checkpoint; continue with: cpt {' '.join(_resume_argv(opts.argv))}",
                            file=sys.stderr,
                        )
                    return 0
            start_model = str(final)
    finally:
        stop.restore()
    if ctx.is_main:
        print(f"done: {opts.output_dir}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Fork:
    """Start a stage from another run's checkpoint: its weights, optimizer and data position."""

    checkpoint: Path
    domains: list[str]  # the checkpointed run's domain order, to map its sampler counts by name


def train_stage(
    recipe: Recipe,
    plan: StagePlan,
    index: int,
    start_model,
    stage_dir: Path,
    resume: bool,
    stop: StopRequest,
    fork: Fork | None = None,
) -> bool:
    """Train one stage to its end (True) or until a stop request was checkpointed (False)."""
    stage, steps = plan.stage, plan.steps
    ctx = distributed_context()
    ckpt_root = stage_dir / "checkpoints"
    batch = stage.batch.global_batch_size
    per_rank = batch // ctx.world_size
    if batch % ctx.world_size or per_rank % stage.batch.micro_batch_size:
        raise CptError(
            f"global_batch_size {batch} must split into {ctx.world_size} processes x whole micro-batches of "
            f"{stage.batch.micro_batch_size}",
            f"stages.{stage.name}.batch",
        )
    if isinstance(start_model, dict):  # a model from scratch is sized for its tokenizer unless told otherwise
        start_model = {"config": {"vocab_size": len(plan.tokenizer), **start_model["config"]}}
    torch.manual_seed(recipe.seed + index)  # identical fresh weights on every rank
    model = build_model(start_model, trust_remote_code=stage.trust_remote_code)
    resize_for_tokenizer(model, plan.tokenizer)
    trainer = build_engine(
        model,
        recipe.distributed,
        stage.optimizer,
        lambda t: lr_at(stage.schedule, t, steps),
        stage.batch.micro_batch_size,
        per_rank // stage.batch.micro_batch_size,
    )
    latest = checkpoint.latest(ckpt_root) if resume else None
    state = {"step": 0, "sampler": None, "offsets": None}
    restored = None  # the checkpoint whose per-rank tensors (the EMA) continue here
    if latest is not None:
        state = checkpoint.load(trainer, latest)
        restored = latest
    elif fork is not None:
        parent = checkpoint.load(trainer, fork.checkpoint)
        counts = dict(zip(fork.domains, parent["sampler"]["counts"]))
        state["offsets"] = [counts.get(d, 0) for d in plan.domains]
        trainer.load_state_dict({"updates": 0, "nonfinite": 0})
        restored = fork.checkpoint
    ema = Ema(trainer.module, stage.ema.decay) if stage.ema is not None else None
    if ema is not None and restored is not None:
        saved = checkpoint.load_rank_tensors(restored, ctx.rank)
        if saved is not None:  # a fork from a run without EMA starts the average at its weights
            ema.load_state_dict(saved)
    sampler = MixtureSampler(
        plan.weights, [len(plan.blocks[d]) for d in plan.domains], batch, recipe.seed, stage.name,
        ctx.rank, ctx.world_size, offsets=state.get("offsets"),
    )
    if state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    start = int(state["step"])
    metrics = MetricsLog(
        stage_dir / "metrics.jsonl",
        enabled=ctx.is_main,
        tensorboard_dir=stage_dir / "tensorboard" if recipe.tensorboard else None,
    )
    metrics.truncate_to(start)
    evaluator = StageEvaluator(recipe, plan, ctx.rank, ctx.world_size) if stage.evaluation.enabled else None
    if evaluator is not None and start > 0:
        evaluator.restore_base(metrics.path)
    torch.distributed.barrier()

    release_steps = set(decay_ends(stage.schedule, steps)) - {steps}
    every = stage.checkpoint.every
    progress = Progress(stage_dir.name, steps, start, enabled=ctx.is_main, every=max(1, steps // 20))
    seq_len = stage.seq_len
    train_seconds = 0.0
    exported = ema.applied if ema is not None and stage.ema.export else nullcontext
    try:
        if evaluator is not None and start == 0:
            metrics.write(evaluator.evaluate(trainer.module, trainer.device, 0, ema))
        for step in range(start, steps):
            started = time.perf_counter()
            rows = sampler.next_step()
            micro = stage.batch.micro_batch_size
            result = trainer.train_step(
                list(_gather(plan, rows).split(micro)), step,
                groups=list(torch.from_numpy(rows[:, 0]).split(micro)), n_groups=len(plan.domains),
            )
            if ema is not None and not result.skipped:
                ema.update()
            train_seconds += time.perf_counter() - started
            done = step + 1
            if done % stage.log_every == 0 or done == steps or result.skipped:
                realized = sampler.realized_blocks() * seq_len
                metrics.write(
                    {
                        "step": step,
                        "tokens": done * stage.tokens_per_step,
                        "lr": result.lr,
                        "loss": result.loss,
                        "grad_norm": result.grad_norm,
                        "skipped": trainer.nonfinite,
                        **{f"loss/{d}": loss for d, loss in zip(plan.domains, result.group_losses) if loss is not None},
                        **{f"tokens/{d}": int(n) for d, n in zip(plan.domains, realized)},
                    }
                )
            progress.update(step, stage.tokens_per_step, result.loss, result.lr)
            if evaluator is not None and evaluator.due(done):
                metrics.write(evaluator.evaluate(trainer.module, trainer.device, done, ema))
            stopping = stop.agreed(ctx.world_size) and done < steps
            if done == steps or stopping or (every and done % every == 0) or done in release_steps:
                client = {"step": done, "sampler": sampler.state_dict(), "offsets": state.get("offsets")}
                checkpoint.save(trainer, ckpt_root, done, client, tokenizer=plan.tokenizer, keep=stage.checkpoint.keep,
                                rank_tensors=ema.state_dict() if ema is not None else None)
            if done in release_steps:
                with exported():
                    export_hf(trainer, plan.tokenizer, stage_dir / "releases" / f"step-{done}")
            if stopping:
                return False
        metrics.close()
        if evaluator is not None and ctx.is_main:
            write_summary(stage_dir, plan, train_seconds if start == 0 else None)
        with exported():
            export_hf(trainer, plan.tokenizer, stage_dir / "final")
        return True
    finally:
        progress.close()
        metrics.close()


def write_summary(stage_dir: Path, plan: StagePlan, train_seconds: float | None) -> None:
    """``<stage>/summary.json`` from the stage's evaluation records (written whole or not at all)."""
    summary = stage_summary(
        read_metrics(stage_dir / "metrics.jsonl"), stage=plan.name, steps=plan.steps, tokens=plan.tokens,
        targeted=plan.stage.evaluation.targets or list(plan.stage.data), train_seconds=train_seconds,
    )
    tmp = stage_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, stage_dir / "summary.json")


def _gather(plan: StagePlan, rows: np.ndarray) -> torch.Tensor:
    """This rank's (rows, seq_len) token ids, read from the domains' memory-mapped blocks."""
    out = np.empty((len(rows), plan.stage.seq_len), dtype=np.int64)
    for domain_index, name in enumerate(plan.domains):
        mine = rows[:, 0] == domain_index
        if mine.any():
            out[mine] = plan.blocks[name][rows[mine, 1]]
    return torch.from_numpy(out)


def _resume_argv(argv: tuple[str, ...]) -> list[str]:
    return [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
