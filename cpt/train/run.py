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
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from cpt import dist
from cpt.config.recipe import Recipe, dump_recipe
from cpt.data.blocks import TokenBatch, read_rows
from cpt.data.sampler import MixtureSampler
from cpt.data.tokenizer import check_tokenizer_matches
from cpt.errors import CptError
from cpt.eval.during_training import StageEvaluator
from cpt.eval.summary import stage_summary
from cpt.io import claim_dir, write_json
from cpt.lock import FILES as LOCK_FILES
from cpt.plan import StagePlan, plan_recipe
from cpt.train.checkpoint import load_rank_tensors
from cpt.train.checkpointer import Checkpointer, Fork, Restored, restore
from cpt.train.ema import Ema
from cpt.train.engine import StepEngine, build_engine, ds_config, free_memory, init_distributed, partitioned_building
from cpt.train.export import export_hf
from cpt.train.job import start_job
from cpt.train.launch import distributed_context
from cpt.train.metrics import MetricsLog, jsonable, read_metrics
from cpt.train.model import (
    build_model,
    compile_blocks,
    enable_activation_checkpointing,
    model_config,
    resize_for_tokenizer,
    set_attention,
    with_overrides,
)
from cpt.train.prefetch import Prefetcher
from cpt.train.vocabulary import grow_embeddings
from cpt.train.progress import Progress
from cpt.train.schedules import lr_at
from cpt.train.step_log import StepLog
from cpt.train.throughput import local_peak_flops
from cpt.train.trackers import open_trackers


@dataclass
class RunOptions:
    output_dir: Path
    resume: bool = False
    overwrite: bool = False
    argv: tuple[str, ...] = ()  # the command's arguments, to tell the user how to resume


# Where the processes run, not what they compute: a run may resume on another number of them.
PLACEMENT = ("num_processes", "hostfile", "master_port")


def prepare_output_dir(recipe: Recipe, opts: RunOptions) -> None:
    """Claim the run directory: never clobber one without --resume or --overwrite."""
    claim_dir(opts.output_dir, "recipe.yaml", dump_recipe(recipe), resume=opts.resume, overwrite=opts.overwrite,
              keep=LOCK_FILES, same=same_run)


def same_run(saved: str, new: str) -> bool:
    """Whether two resolved recipes describe the same run, wherever its processes are placed."""
    def computed(text: str) -> dict:
        recipe = yaml.safe_load(text)
        for key in PLACEMENT:
            recipe.get("distributed", {}).pop(key, None)
        return recipe

    return saved == new or computed(saved) == computed(new)


class StopRequest:
    """SIGTERM / SIGINT ask the run to finish its step, checkpoint and exit cleanly; the ranks agree
    on it in the step's own reduction (:meth:`StepEngine.train_step`), so all stop after one step."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(recipe: Recipe, opts: RunOptions, argv: list[str]) -> int:
    """Lock and claim the directory, prepare the data once, then train here or in the recipe's processes."""
    return start_job(
        opts.output_dir, recipe.distributed, argv, claim=lambda: prepare_output_dir(recipe, opts),
        prepare=lambda: plan_recipe(recipe), work=lambda plans: train(recipe, plans, opts),
    )


def train(recipe: Recipe, plans: list[StagePlan], opts: RunOptions) -> int:
    """Train every unfinished stage; return the process exit code."""
    init_distributed()
    ctx = distributed_context()
    stop = StopRequest()
    try:
        start_model: str | dict | None = None
        for index, plan in enumerate(plans):
            stage = plan.stage
            if not stage.continues:
                start_model = stage.model.path or {"config": stage.model.config}
            # A continued model, or one about to get new rows, must have been trained with the tokenizer
            # the stage starts from: an already-extended model would have its learned rows reset.
            if isinstance(start_model, str) and (stage.continues or plan.extension is not None):
                base = plan.extension.base if plan.extension is not None else plan.tokenizer  # what it was trained with
                check_tokenizer_matches(start_model, base, f"stages.{stage.name}.tokenizer")
            stage_dir = opts.output_dir / stage.name
            final = stage_dir / "final"
            if not (final / "config.json").is_file():
                finished = train_stage(recipe, plan, index, start_model, stage_dir, opts.resume, stop)
                free_memory()  # the stage's engine, optimizer and caches, before the next stage builds its own
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


def fork_stage(recipe: Recipe, plan: StagePlan, index: int, fork: Fork, out_dir: Path, resume: bool) -> bool:
    """Train ``plan`` into ``out_dir`` as a branch that continues ``fork``'s checkpoint exactly
    (weights, optimizer moments, generators, data position); True when it finished."""
    init_distributed()
    # The architecture comes from the checkpoint's config; its weights are loaded from the checkpoint.
    start_model = {"config": read_checkpoint_config(fork.checkpoint)}
    stop = StopRequest()
    try:
        return train_stage(recipe, plan, index, start_model, out_dir, resume, stop, fork=fork)
    finally:
        stop.restore()


def read_checkpoint_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "hf" / "config.json").read_text())


def train_stage(
    recipe: Recipe, plan: StagePlan, index: int, start_model, stage_dir: Path, resume: bool, stop: StopRequest,
    fork: Fork | None = None,
) -> bool:
    """Train one stage to its end (True) or until a stop request was checkpointed (False)."""
    stage, steps, ctx = plan.stage, plan.steps, distributed_context()
    engine = _stage_engine(recipe, plan, index, start_model)
    restored = restore(engine, plan, stage_dir / "checkpoints", resume, fork)
    ema = _stage_ema(engine, stage, restored, ctx.rank)
    sampler = MixtureSampler(
        plan.weights, [len(plan.blocks[d]) for d in plan.domains], stage.batch.global_batch_size, recipe.seed,
        stage.name, ctx.rank, ctx.world_size, offsets=restored.offsets,
    )
    if restored.sampler is not None:
        sampler.load_state_dict(restored.sampler)
    start = restored.step
    trackers = open_trackers(recipe.trackers, recipe.name, stage_dir, recipe.model_dump(mode="json")) if ctx.is_main else []
    metrics = MetricsLog(stage_dir / "metrics.jsonl", enabled=ctx.is_main, trackers=trackers)
    metrics.truncate_to(start)
    evaluator = StageEvaluator(recipe, plan, ctx.rank, ctx.world_size) if stage.evaluation.enabled else None
    if evaluator is not None and start > 0:
        evaluator.restore_base(metrics.path)
    exported = ema.applied if ema is not None and stage.ema.export else nullcontext
    batches = Prefetcher(sampler, lambda step, rows: gather(plan, step, rows), steps, pin=engine.device.type == "cuda")
    checkpointer = Checkpointer(engine, plan, stage_dir, batches, restored, ema, exported)
    progress = Progress(stage_dir.name, steps, start, enabled=ctx.is_main, every=max(1, steps // 20))
    peak = recipe.distributed.peak_flops or local_peak_flops(engine.device, engine.precision)
    log = StepLog(plan, metrics, progress, engine, peak)
    dist.barrier()
    train_seconds = 0.0
    try:
        if evaluator is not None and start == 0:
            metrics.write(_evaluate(evaluator, engine, 0, ema))
        micro = stage.batch.micro_batch_size
        for step in range(start, steps):
            started = time.perf_counter()
            batch = batches.next()
            result = engine.train_step(batch.tokens.split(micro), step, groups=list(batch.domains.split(micro)),
                                       n_groups=len(plan.domains), stop=stop.requested)
            if ema is not None and not result.skipped:
                ema.update()
            seconds = time.perf_counter() - started
            train_seconds += seconds
            done = step + 1
            log.after_step(step, result, engine, batches, seconds)
            if evaluator is not None and evaluator.due(done):
                metrics.write(_evaluate(evaluator, engine, done, ema))
            stopping = result.stop and done < steps
            checkpointer.after_step(done, stopping)
            if stopping:
                return False
        metrics.close()
        if evaluator is not None and ctx.is_main:
            write_summary(stage_dir, plan, train_seconds if start == 0 else None)
        with exported():
            export_hf(engine, plan.tokenizer, stage_dir / "final")
        return True
    finally:
        batches.close()
        progress.close()
        metrics.close()
        engine.close()


def _evaluate(evaluator: StageEvaluator, engine: StepEngine, done: int, ema: Ema | None) -> dict:
    """The held-out record after ``done`` updates, with the engine's parameters given back after."""
    record = evaluator.evaluate(engine.module, engine.device, done, ema)
    engine.release_parameters()
    return record


def _stage_engine(recipe: Recipe, plan: StagePlan, index: int, start_model) -> StepEngine:
    """The stage's starting model wrapped in its DeepSpeed engine, with the stage's lr schedule."""
    stage, world = plan.stage, distributed_context().world_size
    batch = stage.batch.global_batch_size
    per_rank = batch // world
    if batch % world or per_rank % stage.batch.micro_batch_size:
        raise CptError(
            f"global_batch_size {batch} must split into {world} processes x whole micro-batches of "
            f"{stage.batch.micro_batch_size}",
            f"stages.{stage.name}.batch",
        )
    if isinstance(start_model, dict):  # a model from scratch is sized for its tokenizer unless told otherwise
        start_model = {"config": {"vocab_size": len(plan.tokenizer), **start_model["config"]}}
    micro, grad_accum = stage.batch.micro_batch_size, per_rank // stage.batch.micro_batch_size
    own = not stage.continues and start_model == stage.model.path  # not a fork's checkpoint config
    gguf = stage.model.gguf_file if own else None
    try:
        architecture = model_config(start_model, trust_remote_code=stage.trust_remote_code, gguf_file=gguf)
    except CptError as exc:
        raise CptError(exc.message, f"stages.{stage.name}.{exc.where}") from None
    if stage.model is not None and stage.model.overrides is not None:
        architecture = with_overrides(architecture, stage.model.overrides, f"stages.{stage.name}.model.overrides")
    hidden = getattr(architecture, "hidden_size", None)
    config = ds_config(recipe.distributed, stage.optimizer, micro, grad_accum, hidden_size=hidden)
    torch.manual_seed(recipe.seed + index)  # identical fresh weights on every rank
    dtype = torch.bfloat16 if recipe.distributed.precision == "bf16" else torch.float32
    with partitioned_building(config) as partitioned:  # ZeRO-3: no rank ever holds the whole model
        try:
            model = build_model(start_model, trust_remote_code=stage.trust_remote_code, dtype=dtype,
                                partitioned=partitioned, config=architecture, gguf_file=gguf)
        except CptError as exc:
            raise CptError(exc.message, f"stages.{stage.name}.{exc.where}") from None
        if plan.extension is not None:
            grow_embeddings(model, plan.extension)
        resize_for_tokenizer(model, plan.tokenizer)
    set_attention(model, stage.attn_implementation, f"stages.{stage.name}.attn_implementation",
                  asked="attn_implementation" in stage.model_fields_set)
    if stage.memory.activation_checkpointing:
        enable_activation_checkpointing(model, f"stages.{stage.name}.memory.activation_checkpointing")
    if stage.compile:
        compile_blocks(model, f"stages.{stage.name}.compile")
    return build_engine(model, recipe.distributed, stage.optimizer, lambda t: lr_at(stage.schedule, t, plan.steps),
                        micro, grad_accum, config=config)


def _stage_ema(engine: StepEngine, stage, restored: Restored, rank: int) -> Ema | None:
    if stage.ema is None:
        return None
    ema = Ema(engine.module, stage.ema.decay)
    if restored.source is not None:
        saved = load_rank_tensors(restored.source, rank, engine.world_size, dict(zip(ema.state_dict(), ema.params)))
        if saved is not None:  # a fork from a run without EMA starts the average at its weights
            ema.load_state_dict(saved)
    return ema


def write_summary(stage_dir: Path, plan: StagePlan, train_seconds: float | None) -> None:
    """``<stage>/summary.json`` from the stage's evaluation records (written whole or not at all)."""
    summary = stage_summary(
        read_metrics(stage_dir / "metrics.jsonl"), stage=plan.name, steps=plan.steps, tokens=plan.tokens,
        targeted=plan.stage.evaluation.targets or list(plan.stage.data), train_seconds=train_seconds,
    )
    write_json(stage_dir / "summary.json", jsonable(summary), indent=2, allow_nan=False)


def gather(plan: StagePlan, step: int, rows: np.ndarray) -> TokenBatch:
    """This rank's rows of step ``step``, read from the domains' memory-mapped blocks."""
    shape = (len(rows), plan.stage.seq_len)
    ids, targets = np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.int64)
    masking = plan.stage.document_masking
    positions = np.empty(shape, dtype=np.int64) if masking else None
    for domain_index, name in enumerate(plan.domains):
        mine = rows[:, 0] == domain_index
        if mine.any():
            packed, blocks = plan.read(step, name, rows[mine, 1])
            read = read_rows(packed, blocks, masking)
            ids[mine], targets[mine] = read[0], read[1]
            if masking:
                positions[mine] = read[2]
    return TokenBatch(*(torch.from_numpy(a) if a is not None else None for a in (ids, targets, positions)))


def _resume_argv(argv: tuple[str, ...]) -> list[str]:
    return [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
