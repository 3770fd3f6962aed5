"""lm-evaluation-harness tasks scored with the model being trained, in memory.

Tasks are named three ways: ``cpt_nextline`` (one offline next-line task per recipe domain, see
:mod:`cpt.eval.nextline`) or ``cpt_nextline_<domain>``; the path of a task YAML (``.yaml`` or
``.yml``), loaded the way ``lm-eval run --tasks PATH`` loads one; or any name in lm-eval's own
registry (its datasets come from the hub, so those need a connected machine or a warm cache).

The model is wrapped in an ``lm_eval.api.model.LM`` that reports a single process: under ZeRO-3
every rank runs the whole evaluation with the same inputs, so every rank makes the same forward
calls, in the same order, which ZeRO-3's collective weight gathering requires. lm-eval is
imported only when needed: importing it takes seconds, and recipe validation imports this module.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from cpt.errors import CptError
from cpt.eval import nextline
from cpt.schema import Strict

if TYPE_CHECKING:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from cpt.data.sources import DomainConfig

log = logging.getLogger(__name__)

WHERE = "evaluation.harness.tasks"
YAML_SUFFIXES = (".yaml", ".yml")
FEWSHOT_SEED = 1234  # one fixed draw of few-shot examples, so every evaluation of a run sees the same prompts


class HarnessConfig(Strict):
    """lm-evaluation-harness tasks run on the base model, every ``every`` steps, and at each stage end."""

    tasks: list[str] = Field(
        default_factory=lambda: [nextline.PREFIX],
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
        if name == nextline.PREFIX:  # every domain that can make one; naming a domain's task insists on it
            for domain, cfg in domains.items():
                if cfg.heldout == 0:
                    continue
                try:
                    path = nextline.build_nextline_task(domain, cfg, seed, cache_dir, n_examples)
                except CptError as e:
                    log.warning("%s: %s", e.where, e.message)
                    continue
                specs[str(path)] = nextline.task_name(domain)
        elif name.startswith(f"{nextline.PREFIX}_"):
            domain = name.removeprefix(f"{nextline.PREFIX}_")
            if domain not in domains:
                known = ", ".join(nextline.task_name(d) for d in domains) or "none"
                raise CptError(
                    f"unknown harness task {name!r}: the recipe has no domain {domain!r} (known: {known})", WHERE
                )
            if domains[domain].heldout == 0:
                raise CptError(
                    f"harness task {name!r} needs held-out documents, but data.{domain} has heldout: 0", WHERE
                )
            specs[str(nextline.build_nextline_task(domain, domains[domain], seed, cache_dir, n_examples))] = name
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
        raise CptError(f"two harness tasks report results as {clash!r}: keep one of them", WHERE)
    return HarnessTasks(tuple(specs), tuple(reported), bool(registry) or needs_registry)


def task_problem(name: str, domains: Mapping[str, DomainConfig]) -> str | None:
    """What is wrong with a task name, as far as can be told without lm-eval (for `cpt validate`)."""
    if name.startswith(f"{nextline.PREFIX}_"):
        domain = name.removeprefix(f"{nextline.PREFIX}_")
        if domain not in domains:
            return f"unknown harness task {name!r}: the recipe has no domain {domain!r}"
        if domains[domain].heldout == 0:
            return f"harness task {name!r} needs held-out documents, but data.{domain} has heldout: 0"
    elif name.lower().endswith(YAML_SUFFIXES) and not Path(name).expanduser().is_file():
        return f"harness task file {name} does not exist"
    return None


def _read_task_yaml(name: str) -> tuple[Path, dict[str, Any]]:
    """The task YAML's path and its configuration, read as lm-eval reads it (``include:`` merged,
    ``!function`` tags left as text: nothing is imported or run)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise CptError(f"harness task file {name} does not exist", WHERE)
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # YAML syntax, a missing include, a non-mapping: the file cannot be used
        raise CptError(f"cannot read harness task file {name}: {e}", WHERE) from e
    return path, cfg


def _yaml_task_name(path: Path, cfg: dict[str, Any]) -> str:
    name = cfg.get("group") or cfg.get("task")
    if not isinstance(name, str) or not name:
        raise CptError(f"harness task file {path} names no task: it needs a 'task:' (or 'group:') name", WHERE)
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
                WHERE,
            )
        if entry.cfg is not None:
            _refuse_generation(name, entry.cfg)


def _refuse_generation(name: str, cfg: Mapping[str, Any]) -> None:
    if cfg.get("output_type") == "generate_until":
        raise CptError(_GENERATION_UNSUPPORTED.format(name=name), WHERE)


_GENERATION_UNSUPPORTED = (
    "harness task {name!r} generates text, which the in-training harness does not do; "
    "keep loglikelihood and multiple-choice tasks here and run generative ones on the exported "
    "checkpoint with lm-eval's own hf model"
)


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
    num_fewshot: int = 0,
    max_length: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task (and group) of ``tasks``, scored with ``model``.

    Metric names are lm-eval's without the default filter's ``,none`` suffix; standard errors are
    not computed. The model's train/eval mode is restored, and so are the global ``random`` and
    numpy generators, which lm-eval advances (the training data order must not depend on whether
    an evaluation ran).
    """
    if not tasks.specs:
        return {}
    from lm_eval.evaluator import evaluate

    lm = harness_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, rank=rank, world_size=world_size)
    with _quiet_lm_eval(), _global_rngs_kept():
        try:
            loaded = _task_manager(tasks.registry).load(list(tasks.specs))
        except Exception as e:  # a hub dataset out of reach, a bad task file: the task cannot run
            raise CptError(f"cannot load harness tasks {', '.join(tasks.names)}: {e}", WHERE) from e
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


# --- scoring ---


def prefix_token(tokenizer) -> int:
    """The token a document starts after: BOS, or EOS for tokenizers without one (cpt packs
    documents separated by EOS, so a scored text is seen exactly as a document start)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise CptError("the tokenizer has neither a BOS nor an EOS token to start a scored text with", "tokenizer")
    return token


def loglikelihoods(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int, max_length: int,
    rank: int = 0, world_size: int = 1,
) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether greedy decoding gives the continuation,
    for each (context ids, continuation ids) pair; contexts must not be empty.

    A pair longer than ``max_length + 1`` tokens loses tokens from the left (the continuation's
    too, when it alone is longer). Pairs run longest first in batches of ``batch_size``, padded on
    the right: with causal attention, padding after a token never changes its prediction. With
    several processes the batches are dealt to ranks round-robin and the scores all-reduced;
    every rank runs the same number of forward passes (a rank short of batches repeats one and
    ignores it), as a ZeRO-3 forward gathers weights collectively.
    """
    import torch

    from cpt.eval.heldout import no_grad_for

    windows = [(context + continuation)[-(max_length + 1) :] for context, continuation in pairs]
    scored = [min(len(continuation), len(w) - 1) for w, (_, continuation) in zip(windows, pairs)]
    order = sorted(range(len(pairs)), key=lambda i: -len(windows[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    scores = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)  # log-likelihood, greedy (0/1)
    was_training = model.training
    model.eval()
    try:
        with no_grad_for(model):
            for turn in range(math.ceil(len(batches) / world_size)):
                index = turn * world_size + rank
                rows = batches[index] if index < len(batches) else batches[0]
                width = len(windows[rows[0]]) - 1
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, : len(windows[i]) - 1] = torch.tensor(windows[i][:-1])
                    mask[r, : len(windows[i]) - 1] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                if index >= len(batches):  # keep step with the other ranks
                    continue
                for r, i in enumerate(rows):
                    end, n = len(windows[i]) - 1, scored[i]
                    logprobs = torch.log_softmax(logits[r, end - n : end].float(), dim=-1)
                    targets = torch.tensor(windows[i][-n:], device=logprobs.device)
                    scores[i, 0] = logprobs.gather(-1, targets[:, None]).sum()
                    scores[i, 1] = float((logprobs.argmax(-1) == targets).all())
    finally:
        model.train(was_training)
    if world_size > 1:
        torch.distributed.all_reduce(scores)
    return [(total, bool(greedy)) for total, greedy in scores.tolist()]


def harness_lm(model: torch.nn.Module, tokenizer, *, batch_size: int, max_length: int | None = None,
               rank: int = 0, world_size: int = 1) -> LM:
    """``model`` as an lm-eval ``LM``; ``max_length`` defaults to the model's position limit."""
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
        if max_length is None:
            raise CptError("the model config has no max_position_embeddings: give the harness a max_length", "model")
    return _lm_class()(model, tokenizer, batch_size, max_length, rank, world_size)


@functools.cache
def _lm_class() -> type[LM]:
    """The LM subclass, defined on first use so that importing this module does not import lm-eval."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class ModelLM(LM):
        """Scores lm-eval requests with an in-memory model. A single process as far as lm-eval
        knows: every rank builds the same requests, and the forward passes are shared out below."""

        def __init__(self, model, tokenizer, batch_size: int, max_length: int, rank: int, world_size: int):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size, self.max_length = batch_size, max_length
            self.shard = {"rank": rank, "world_size": world_size}
            self.prefix = prefix_token(tokenizer)

        def _score(self, pairs):
            return loglikelihoods(self.model, pairs, batch_size=self.batch_size, max_length=self.max_length,
                                  **self.shard)

        def _encode(self, texts: Sequence[str]) -> dict[str, list[int]]:
            unique = list(dict.fromkeys(texts))
            return dict(zip(unique, self.tokenizer(unique, add_special_tokens=False)["input_ids"]))

        def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
            # Trailing whitespace of a context belongs to the continuation's first word.
            pairs = []
            for context, continuation in (request.args for request in requests):
                stripped = context.rstrip()
                pairs.append((stripped, context[len(stripped) :] + continuation))
            ids = self._encode([text for pair in pairs for text in pair])
            token_pairs = [([self.prefix, *ids[c]], ids[x]) for c, x in pairs]
            return self._score(token_pairs)

        def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
            texts = [request.args[0] for request in requests]
            ids = self._encode(texts)
            windows = [
                [make_disjoint_window(w) for w in get_rolling_token_windows(ids[t], self.prefix, self.max_length, 1)]
                for t in texts
            ]
            flat = [w for doc in windows for w in doc]
            scores = iter(self._score(flat))
            return [sum(next(scores)[0] for _ in doc) for doc in windows]

        def generate_until(self, requests: list[Instance]) -> list[str]:
            name = requests[0].task_name if requests else "?"
            raise CptError(_GENERATION_UNSUPPORTED.format(name=name), WHERE)

    return ModelLM
