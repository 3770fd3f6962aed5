"""metrics.jsonl: one JSON object per logged step, appended and flushed as training goes.

On resume the file is cut back to the checkpoint's step, so a resumed run's file reads exactly
like an uninterrupted one's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from cpt import faults
from cpt.io import io_errors, write_text
from cpt.train.trackers import Tracker


class MetricsLog:
    def __init__(self, path: Path, *, enabled: bool = True, trackers: Sequence[Tracker] = ()):
        """``trackers`` (:mod:`cpt.train.trackers`) receive every record's numbers too."""
        self.path = path
        self.enabled = enabled
        self._file = None
        self._trackers = list(trackers) if enabled else []

    def truncate_to(self, updates: int) -> None:
        """Keep what a run that stopped after ``updates`` steps had written, atomically: training
        records of steps before it (``step`` is 0-based) and evaluations up to it (``step`` counts
        updates done); the rest is work a crash threw away."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and _updates_of(line) <= updates]
        write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with io_errors(self.path):  # a torn line from a full disk is dropped by the next truncate_to
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(jsonable(record)) + "\n")
            self._file.flush()
            faults.point("metrics.write", self.path)
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self._trackers:
            tracker.log(numbers, int(record["step"]) + (record.get("kind") != "eval"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Keys that measure the machine, not the training: identical runs (and a resumed run) differ in them.
MEASURED = frozenset({"tokens_per_s", "mfu"})


def reproducible(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a record that a deterministic run reproduces exactly."""
    return {k: v for k, v in record.items() if k not in MEASURED}


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") != "eval"]


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "eval"]


def _updates_of(line: str) -> int:
    """Updates done when the record was written."""
    try:
        record = json.loads(line)
        return int(record["step"]) + (record.get("kind") != "eval")
    except (ValueError, KeyError, TypeError, AttributeError):
        return 1 << 62  # a torn last line from a crash: drop it


def jsonable(value: Any) -> Any:
    """Non-finite floats (at any depth) become strings, so the output stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
