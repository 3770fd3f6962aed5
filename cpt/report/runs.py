"""Read run directories into stages placed on one token axis.

A run's stages are laid end to end in recipe order: stage k's tokens are offset by the final
tokens of every earlier stage, so a multi-stage run reads as one curve. Only stages that have
logged something are kept; a stage still training simply ends where its metrics end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cpt.errors import CptError
from cpt.paths import read_text


@dataclass
class StageData:
    name: str
    targeted: list[str]  # evaluation.targets, else the domains the stage defines in its own `data`
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any] | None  # summary.json, None while the stage is unfinished
    offset: int = 0  # tokens of the run's earlier stages

    @property
    def final_tokens(self) -> int:
        if self.summary is not None and isinstance(self.summary.get("tokens"), (int, float)):
            return int(self.summary["tokens"])
        return max((int(r["tokens"]) for r in self.train + self.evals), default=0)

    def series(self, key: str, *, evals: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(cumulative tokens, values) of the records that have ``key``; "nan"/"inf"/null read as floats."""
        records = [r for r in (self.evals if evals else self.train) if key in r]
        x = np.array([self.offset + int(r["tokens"]) for r in records], dtype=np.int64)
        return x, np.array([as_float(r[key]) for r in records], dtype=float)

    def keys(self, prefix: str, suffix: str = "", *, evals: bool = False) -> list[str]:
        """The middle parts of keys ``prefix<middle>suffix`` in order of first appearance."""
        found: dict[str, None] = {}
        for record in self.evals if evals else self.train:
            for key in record:
                if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                    found[key[len(prefix): len(key) - len(suffix)]] = None
        return list(found)


@dataclass
class RunData:
    path: Path
    label: str
    stages: list[StageData] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)  # recipe order, then any only seen in metrics


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def stage_offsets(final_tokens: Sequence[int]) -> list[int]:
    """Where each stage starts on the cumulative token axis."""
    return [0, *np.cumsum(final_tokens[:-1], dtype=np.int64).tolist()] if len(final_tokens) else []


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [Path(p).resolve().name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def ordered_union(lists) -> list[str]:
    return list(dict.fromkeys(item for items in lists for item in items))


def load_runs(paths: Sequence[Path]) -> list[RunData]:
    return [load_run(Path(p), label) for p, label in zip(paths, run_labels(paths))]


def load_run(path: Path, label: str | None = None) -> RunData:
    where = str(path)
    if not path.exists():
        raise CptError("no such run directory", where)
    if not path.is_dir():
        raise CptError("not a directory; give a run directory (the output_dir of `cpt run`)", where)
    names, targeted = _recipe_stages(path)
    stages = []
    for name in names:
        metrics = path / name / "metrics.jsonl"
        if not metrics.is_file():
            continue
        train, evals = read_metrics(metrics)
        if train or evals:
            stages.append(StageData(name, targeted[name], train, evals, _read_summary(path / name / "summary.json")))
    if not stages:
        raise CptError(f"no metrics yet: none of the stages ({', '.join(names)}) has a non-empty metrics.jsonl", where)
    for stage, offset in zip(stages, stage_offsets([s.final_tokens for s in stages])):
        stage.offset = offset
    domains = ordered_union(
        [[d for name in names for d in targeted[name]]]
        + [s.keys("eval/", "/loss", evals=True) + s.keys("loss/") for s in stages]
    )
    return RunData(path, label or path.resolve().name, stages, domains)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Training and eval records. A torn last line (a run writing right now) is skipped."""
    lines = [(i, line) for i, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    train, evals = [], []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == lines[-1][0]:
                break
            raise CptError(f"line {number} is not valid JSON", str(path)) from None
        if not isinstance(record, dict) or not isinstance(record.get("tokens"), (int, float)):
            raise CptError(f"line {number} is not a metrics record (an object with a numeric 'tokens')", str(path))
        kind = record.get("kind")
        if kind is None:
            train.append(record)
        elif kind == "eval":
            evals.append(record)
    return train, evals


def _recipe_stages(run_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise CptError("not a cpt run directory (no recipe.yaml)", str(run_dir))
    try:
        raw = yaml.safe_load(read_text(recipe))
    except yaml.YAMLError as exc:
        raise CptError(f"not valid YAML: {exc}", str(recipe)) from None
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages):
        raise CptError("expected `stages:` as a list of mappings with a `name`", str(recipe))
    names = [s["name"] for s in stages]
    return names, {s["name"]: _targets(s) for s in stages}


def _targets(stage: dict) -> list[str]:
    """The domains a stage means to learn: ``evaluation.targets``, else its own domains."""
    evaluation = stage.get("evaluation")
    targets = evaluation.get("targets") if isinstance(evaluation, dict) else None
    return list(targets) if targets else list(stage.get("data") or {})


def _read_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise CptError(f"not valid JSON: {exc}", str(path)) from None
    if not isinstance(summary, dict):
        raise CptError("expected a JSON object", str(path))
    return summary
