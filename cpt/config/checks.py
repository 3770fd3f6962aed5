"""Recipe checks that need more than one field: stage order, mixtures against the known domains,
schedules against stage lengths, harness tasks, files that must exist."""

from __future__ import annotations

import importlib.util
import os

from cpt.config.evaluation import task_problem
from cpt.config.recipe import Recipe, Stage
from cpt.config.schedule import validate_schedule
from cpt.data.mixture import weight_matrix
from cpt.data.sources import check_domain
from cpt.errors import CptError
from cpt.paths import gguf_path, local_dir


def check_recipe(recipe: Recipe, *, check_files: bool = True) -> list[CptError]:
    """Problems that need the whole recipe (or the file system) to see."""
    errors: list[CptError] = []
    seen: set[str] = set()
    known: set[str] = set()
    for index, stage in enumerate(recipe.stages):
        where = f"stages.{stage.name}"
        if stage.name in seen:
            errors.append(CptError(f"duplicate stage name {stage.name!r}", f"stages.{index}.name"))
        seen.add(stage.name)
        if index == 0 and stage.continues:
            errors.append(CptError("the first stage needs a model (an HF dir, a hub id or {config: ...})", f"{where}.model"))
        elif index == 0 and stage.tokenizer is None and stage.model.path is None:
            errors.append(CptError("a model built from a config needs a tokenizer (a path or {train: ...})", f"{where}.tokenizer"))
        redefined = sorted(set(stage.data) & known)
        if redefined:
            errors.append(CptError(f"domain {redefined[0]!r} is already defined by an earlier stage", f"{where}.data"))
        previous_known = set(known)
        known |= set(stage.data)
        if not stage.data:
            errors.append(CptError("the stage defines no data domains of its own", f"{where}.data"))
        else:
            errors.extend(_mixture_problems(stage, previous_known, known, where))
        unknown = [d for d in stage.evaluation.targets or [] if d not in known]
        if unknown:
            errors.append(CptError(f"unknown domain {unknown[0]!r}; known domains: {', '.join(sorted(known))}",
                                   f"{where}.evaluation.targets"))
        extend = stage.tokenizer.extend if stage.tokenizer is not None else None
        unknown = [d for d in extend.from_ if d not in known] if extend is not None else []
        if unknown:
            errors.append(CptError(f"unknown domain {unknown[0]!r}; known domains: {', '.join(sorted(known))}",
                                   f"{where}.tokenizer.extend.from"))
        for task in stage.evaluation.harness.tasks:
            problem = task_problem(task, recipe.domains())
            if problem:
                errors.append(CptError(problem, f"{where}.evaluation.harness.tasks"))
        try:
            validate_schedule(stage.schedule, stage.total_steps)
        except CptError as exc:
            errors.append(CptError(exc.message, f"{where}.{exc.where or 'schedule'}"))
        if check_files:
            errors.extend(_file_problems(stage, where))
    if check_files:
        for i, name in enumerate(recipe.trackers):  # each tracker's package is named as the tracker
            if importlib.util.find_spec(name) is None:
                errors.append(CptError(f"{name} needs the {name} package (pip install {name})", f"trackers[{i}]"))
    return errors


def _mixture_problems(stage: Stage, previous_known: set[str], known: set[str], where: str) -> list[CptError]:
    """Run the real mixture resolution with placeholder sizes: catches every naming problem."""
    replay_shares = dict.fromkeys(sorted(previous_known), 1.0) or None
    try:
        weight_matrix(stage.mixture, 1, list(stage.data), sorted(known), dict.fromkeys(stage.data, 1), replay_shares)
    except CptError as exc:
        return [CptError(exc.message, f"{where}.{exc.where}")]
    return []


def _file_problems(stage: Stage, where: str) -> list[CptError]:
    errors = []
    for name, domain in stage.data.items():
        try:
            check_domain(domain)
        except CptError as exc:
            errors.append(CptError(exc.message, f"{where}.data.{name}.{exc.where or 'source'}"))
    for field, spec in (("model", stage.model), ("tokenizer", stage.tokenizer)):
        path = spec and spec.path
        if path is None:
            continue
        try:
            local = local_dir(path, f"{where}.{field}")
            if spec.gguf_file is not None:
                gguf_path(path, spec.gguf_file, f"{where}.{field}.gguf_file")
        except CptError as exc:
            errors.append(exc)
            continue
        files = (spec.gguf_file,) if spec.gguf_file else ("config.json", "tokenizer_config.json", "tokenizer.json")
        if local is None and os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(path, files):
            errors.append(CptError(f"{path} is not a local directory, not in the Hugging Face cache, and the hub "
                                   "is not reachable (HF_HUB_OFFLINE=1)", f"{where}.{field}"))
    return errors


def _in_hub_cache(repo_id: str, files: tuple[str, ...]) -> bool:
    """Whether a hub id was downloaded before (any of ``files``): offline, transformers loads it from the cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in files)
    except ValueError:  # not a valid repo id
        return False
