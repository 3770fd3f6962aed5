"""lm-evaluation-harness tasks: which ones a stage runs, and running them on the model being trained.

Tasks are named three ways: ``cpt_nextline`` (one offline next-line task per recipe domain, see
:mod:`cpt.eval.nextline`) or ``cpt_nextline_<domain>``; the path of a task YAML (``.yaml`` or
``.yml``), loaded the way ``lm-eval run --tasks PATH`` loads one; or any name in lm-eval's own
registry (its datasets come from the hub, so those need a connected machine or a warm cache).
The model scores them through :mod:`cpt.eval.lm_adapter`. lm-eval is imported only when a task
needs it: importing it takes seconds, and `cpt run` imports this module for every stage.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt.config.evaluation import (
    NEXTLINE,
    TASKS_FIELD,
    YAML_SUFFIXES,
    generation_unsupported,
    nextline_task,
    task_problem,
)
from cpt.errors import CptError
from cpt.eval.nextline import build_nextline_task

if TYPE_CHECKING:
    import torch
    from lm_eval.tasks import TaskManager

    from cpt.config.data import DomainConfig

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # one fixed draw of few-shot examples, so every evaluation of a run sees the same prompts


@dataclass(frozen=True)
class HarnessTasks:
    """What to hand lm-eval, resolved once before training so a bad name fails early."""

    specs: tuple[str, ...] = ()  # a registry name, or the absolute path of a task YAML
    names: tuple[str, ...] = ()  # the task (or group) name each spec reports its results under
    registry: bool = False  # some spec needs lm-eval's own task index (building it takes seconds)


def resolve_tasks(
    names: Sequence[str], domains: Mapping[str, DomainConfig], seed: int, cache_dir: Path, n_examples: int
) -> HarnessTasks:
    """Check every task name and build the offline tasks it needs; raises CptError naming a bad one."""
    specs: dict[str, str] = {}  # spec -> reported name, in order, without repeats
    registry: list[str] = []
    needs_registry = False
    for name in names:
        problem = task_problem(name, domains)
        if problem:
            raise CptError(problem, TASKS_FIELD)
        if name == NEXTLINE:  # every domain that can make one; naming a domain's task insists on it
            for domain, cfg in domains.items():
                if cfg.heldout == 0:
                    continue
                try:
                    path = build_nextline_task(domain, cfg, seed, cache_dir, n_examples)
                except CptError as e:
                    log.warning("%s: %s", e.where, e.message)
                    continue
                specs[str(path)] = nextline_task(domain)
        elif name.startswith(f"{NEXTLINE}_"):
            domain = name.removeprefix(f"{NEXTLINE}_")
            specs[str(build_nextline_task(domain, domains[domain], seed, cache_dir, n_examples))] = name
        elif name.lower().endswith(YAML_SUFFIXES):
            path, cfg = _read_task_yaml(name)
            specs[str(path)] = _yaml_task_name(path, cfg)
            needs_registry |= "group" in cfg  # a group names its member tasks, which may be lm-eval's
        else:
            specs[name] = name
            registry.append(name)
    if registry:
        _check_registry_names(registry)
    reported = list(specs.values())
    clash = next((n for n in reported if reported.count(n) > 1), None)
    if clash is not None:
        raise CptError(f"two harness tasks report results as {clash!r}: keep one of them", TASKS_FIELD)
    return HarnessTasks(tuple(specs), tuple(reported), bool(registry) or needs_registry)


def _read_task_yaml(name: str) -> tuple[Path, dict[str, Any]]:
    """The task YAML's path and its configuration, read as lm-eval reads it (``include:`` merged,
    ``!function`` tags left as text: nothing is imported or run)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(name).expanduser().resolve()
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # YAML syntax, a missing include, a non-mapping: the file cannot be used
        raise CptError(f"cannot read harness task file {name}: {e}", TASKS_FIELD) from e
    return path, cfg


def _yaml_task_name(path: Path, cfg: dict[str, Any]) -> str:
    name = cfg.get("group") or cfg.get("task")
    if not isinstance(name, str) or not name:
        raise CptError(
            f"harness task file {path} names no task: it needs a 'task:' (or 'group:') name", TASKS_FIELD
        )
    _refuse_generation(name, cfg)
    return name


def _check_registry_names(names: Sequence[str]) -> None:
    manager = _task_manager(True)
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CptError(
                f"unknown harness task {name!r}: not cpt_nextline[_<domain>], not a task .yaml file, "
                f"and not among the {len(manager.all_tasks)} tasks, groups and tags of lm-eval's registry{hint}",
                TASKS_FIELD,
            )
        if entry.cfg is not None:
            _refuse_generation(name, entry.cfg)


def _refuse_generation(name: str, cfg: Mapping[str, Any]) -> None:
    if cfg.get("output_type") == "generate_until":
        raise generation_unsupported(name)


@functools.cache
def _task_manager(registry: bool) -> TaskManager:
    """lm-eval's task index, built once per process: with its registry it reads ~14k YAML files."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager(include_defaults=registry)


def run_harness(
    model: torch.nn.Module,
    tokenizer,
    tasks: HarnessTasks,
    *,
    limit: int | None,
    batch_size: int,
    device: torch.device,
    num_fewshot: int = 0,
    max_length: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    document_masking: bool = False,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task (and group) of ``tasks``, scored with ``model``
    (``document_masking``: as a model trained with it reads a document, see :class:`ModelLM`).

    Metric names are lm-eval's without the default filter's ``,none`` suffix; standard errors are
    not computed. The model's train/eval mode is restored, and so are the global ``random`` and
    numpy generators, which lm-eval advances (the training data order must not depend on whether
    an evaluation ran).
    """
    if not tasks.specs:
        return {}
    from lm_eval.evaluator import evaluate

    from cpt.eval.lm_adapter import harness_lm

    lm = harness_lm(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length, rank=rank,
                    world_size=world_size, document_masking=document_masking)
    with _quiet_lm_eval(), _global_rngs_kept():
        try:
            loaded = _task_manager(tasks.registry).load(list(tasks.specs))
        except Exception as e:  # a hub dataset out of reach, a bad task file: the task cannot run
            raise CptError(f"cannot load harness tasks {', '.join(tasks.names)}: {e}", TASKS_FIELD) from e
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0:  # a task that pins zero-shot keeps it
                task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        results = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    return {name: plain_metrics(values) for name, values in {**results["results"], **results.get("groups", {})}.items()}


def plain_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": "x"}`` -> ``{"acc": 0.5}``."""
    metrics = {}
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if (
            not filter_name
            or metric.endswith("_stderr")
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            continue
        metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO and draws a progress bar per task while it builds requests;
    keep its warnings (unless the user set its level themselves) and drop the bars (its own and
    those of `datasets` loading the task files)."""
    import datasets
    import lm_eval.api.task as task_module

    logger = logging.getLogger("lm_eval")
    chosen, bar = logger.level, task_module.tqdm
    if chosen == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    task_module.tqdm = functools.partial(bar, disable=True)
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(chosen)
        task_module.tqdm = bar
        if not bars_were_off:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

