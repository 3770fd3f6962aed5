"""What a stage did, in a few numbers: adaptation, forgetting and the stability gap.

Computed from the stage's evaluation records alone (see ``cpt/train/run.py`` for their keys), so
``summary.json`` can be rebuilt from ``metrics.jsonl`` at any time.

- adaptation: mean drop of held-out loss (base - final) over the domains the stage trains on.
- forgetting: mean rise of held-out loss (final - base) over every other domain of the recipe.
- stability gap (Guo et al. 2024): at the start of continual pre-training a domain's loss can
  first rise above its starting value before it falls. ``gap`` is the largest rise before the
  loss first drops below the base value, ``recovered_step`` the step at which it does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from cpt.train.metrics import eval_records


def stability_gap(series: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """``series``: (step, delta) in step order, delta = loss - base loss."""
    peak, peak_step = 0.0, None
    for step, delta in series:
        if delta < 0:
            return {"gap": peak, "peak_step": peak_step, "recovered_step": step}
        if delta > peak:
            peak, peak_step = delta, step
    return {"gap": peak, "peak_step": peak_step, "recovered_step": None}


def domain_summary(series: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """``series``: (step, loss) of one domain in step order, the first being the base model."""
    base = series[0][1]
    final = series[-1][1]
    worst_step, worst = max(((s, loss - base) for s, loss in series), key=lambda x: x[1])
    return {
        "base_loss": base,
        "final_loss": final,
        "final_delta": final - base,
        "max_delta": worst,
        "max_delta_step": worst_step,
    }


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return fmean(finite) if finite and len(finite) == len(values) else (math.nan if values else None)


def weights_summary(evals: Sequence[dict[str, Any]], targeted: Sequence[str], prefix: str = "") -> dict[str, Any]:
    """Per-domain, forgetting, adaptation, stability gap and harness change for one set of weights
    (``prefix`` "" for the trained weights, "ema/" for their moving average)."""
    domains, gaps = {}, {}
    names = sorted({k.split("/")[-2] for r in evals for k in r if k.startswith(f"{prefix}eval/") and k.endswith("/loss")})
    for name in names:
        key = f"{prefix}eval/{name}/loss"
        series = [(int(r["step"]), float(r[key])) for r in evals if key in r]
        domains[name] = {**domain_summary(series), "targeted": name in targeted}
        if name in targeted:
            gaps[name] = stability_gap([(s, loss - series[0][1]) for s, loss in series[1:]])
    other = [d for d in domains if d not in targeted]
    harness: dict[str, dict[str, Any]] = {}
    for key in sorted({k for r in evals for k in r if k.startswith(f"{prefix}harness/")}):
        task, metric = key[len(prefix) :].split("/", 2)[1:]
        values = [float(r[key]) for r in evals if key in r]
        harness.setdefault(task, {})[metric] = {"base": values[0], "final": values[-1], "change": values[-1] - values[0]}
    return {
        "domains": domains,
        "forgetting": _mean([domains[d]["final_delta"] for d in other]),
        "adaptation": _mean([-domains[d]["final_delta"] for d in domains if d in targeted]),
        "stability_gap": gaps,
        "harness": harness,
    }


def stage_summary(
    records: Sequence[dict[str, Any]], *, stage: str, steps: int, tokens: int, targeted: Sequence[str],
    train_seconds: float | None = None,
) -> dict[str, Any]:
    """The content of ``<stage>/summary.json``."""
    evals = eval_records(records)
    if not evals:
        raise ValueError(f"stage {stage} has no evaluation records")
    summary = {"stage": stage, "steps": steps, "tokens": tokens, **weights_summary(evals, targeted)}
    summary["targeted"] = [d for d in summary["domains"] if d in targeted]
    summary["other"] = [d for d in summary["domains"] if d not in targeted]
    if any(k.startswith("ema/") for r in evals for k in r):
        summary["ema"] = weights_summary(evals, targeted, prefix="ema/")
    tokens_read = sum(float(r.get("eval/tokens", 0)) for r in evals)
    heldout_seconds = sum(float(r.get("eval/heldout_seconds", 0.0)) for r in evals)
    summary["eval_seconds"] = sum(float(r.get("eval/seconds", 0.0)) for r in evals)
    summary["eval_tokens_per_s"] = tokens_read / heldout_seconds if heldout_seconds else None
    summary["train_tokens_per_s"] = tokens / train_seconds if train_seconds else None
    return summary
