"""One table row per (run, stage): forgetting, adaptation, final deltas, stability gap, harness.

A finished stage's row is read from its summary.json (and a second row for its EMA weights when
it kept one). An unfinished stage has no summary yet: its row is computed from the eval records
logged so far by the same function that writes summary.json, and marked unfinished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cpt.eval.summary import weights_summary
from cpt.report.runs import RunData, StageData, as_float


@dataclass
class StageRow:
    run: str
    stage: str
    finished: bool
    steps: int | None
    tokens: int | None
    targeted: list[str]
    forgetting: float | None  # mean final delta over the other domains; None when there are none
    adaptation: float | None  # mean (base - final) loss over the targeted domains
    final_delta: dict[str, float] = field(default_factory=dict)
    stability_gap: dict[str, dict[str, Any]] = field(default_factory=dict)  # gap, peak_step, recovered_step
    harness: dict[str, dict[str, float]] = field(default_factory=dict)  # "task/metric" -> base, final, change


def table_rows(runs: list[RunData]) -> list[StageRow]:
    rows = []
    for run in runs:
        for stage in run.stages:
            prefixes = [""] + (["ema/"] if _has_ema(stage) else [])
            for prefix in prefixes:
                rows.append(_row(run.label, stage, prefix))
    return rows


def _has_ema(stage: StageData) -> bool:
    if stage.summary is not None:
        return isinstance(stage.summary.get("ema"), dict)
    return bool(stage.keys("ema/eval/", "/loss", evals=True))


def _row(run: str, stage: StageData, prefix: str) -> StageRow:
    label = f"{stage.name} (EMA)" if prefix else stage.name
    if stage.summary is not None:
        block = stage.summary["ema"] if prefix else stage.summary
        return row_from_summary(run, label, stage.summary, block, finished=True)
    last = stage.train[-1] if stage.train else {}
    so_far = {"steps": int(last["step"]) + 1 if "step" in last else None, "tokens": last.get("tokens"),
              "targeted": stage.targeted}
    return row_from_summary(run, label, so_far, weights_summary(stage.evals, stage.targeted, prefix), finished=False)


def row_from_summary(run: str, label: str, summary: dict[str, Any], block: dict[str, Any], *,
                     finished: bool) -> StageRow:
    """``block`` is the summary itself, or its "ema" part for the EMA weights."""
    domains = block.get("domains") or {}
    harness = {
        f"{task}/{metric}": {k: as_float(v) for k, v in values.items()}
        for task, metrics in (block.get("harness") or {}).items()
        for metric, values in metrics.items()
    }
    return StageRow(
        run=run, stage=label, finished=finished,
        steps=summary.get("steps"), tokens=summary.get("tokens"),
        targeted=list(summary.get("targeted") or [d for d, v in domains.items() if v.get("targeted")]),
        forgetting=_optional(block.get("forgetting")), adaptation=_optional(block.get("adaptation")),
        final_delta={d: as_float(v.get("final_delta")) for d, v in domains.items()},
        stability_gap=dict(block.get("stability_gap") or {}),
        harness=harness,
    )


def _optional(value: Any) -> float | None:
    return None if value is None else as_float(value)


# ----------------------------------------------------------------------------- cells


def table_cells(rows: list[StageRow]) -> tuple[list[str], list[list[str]]]:
    """Header and body as text; the run column only when rows come from several runs."""
    domains = list(dict.fromkeys(d for row in rows for d in row.final_delta))
    with_run = len({row.run for row in rows}) > 1
    header = (["run"] if with_run else []) + [
        "stage", "status", "steps", "tokens", "targeted", "forgetting", "adaptation",
        *[f"Δ {d}" for d in domains], "stability gap", "harness change",
    ]
    body = []
    for row in rows:
        cells = [
            row.stage, "finished" if row.finished else "unfinished",
            _count(row.steps), _count(row.tokens), ", ".join(row.targeted) or "–",
            _number(row.forgetting), _number(row.adaptation),
            *[_number(row.final_delta.get(d)) for d in domains],
            "; ".join(_gap_cell(d, g) for d, g in row.stability_gap.items()) or "–",
            "; ".join(
                f"{k} {_number(v.get('base'), signed=False)}→{_number(v.get('final'), signed=False)} "
                f"({_number(v.get('change'))})"
                for k, v in row.harness.items()
            ) or "–",
        ]
        body.append(([row.run] if with_run else []) + cells)
    return header, body


def _number(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "–"
    value = as_float(value)
    if math.isnan(value):
        return "nan"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{int(value):,}"


def _gap_cell(domain: str, gap: dict[str, Any]) -> str:
    size = as_float(gap.get("gap"))
    if not size > 0:
        return f"{domain} none"
    recovered = gap.get("recovered_step")
    back = f"recovered at step {recovered}" if recovered is not None else "not recovered"
    return f"{domain} {size:.3f} (peak at step {gap.get('peak_step')}, {back})"
