"""What `cpt fit` reports: the fits of a table turned into one JSON-ready object, with predictions.

The object is the contract of `cpt fit --json` (see docs/laws.md); the CMR block is what recipes
read back through :func:`cpt.laws.cmr.cmr_ratio_at`.
"""

from __future__ import annotations

import math

import numpy as np

from cpt.errors import CptError
from cpt.laws.cmr import (
    CmrResult,
    Tolerance,
    cmr_ratio_at,
    critical_mixture_ratio,
    read_sweep,
)
from cpt.laws.fitting import LawFit, analyse, scores
from cpt.laws.options import FitOptions
from cpt.laws.problems import Problem, problems
from cpt.laws.table import Table


def finite(value):
    """JSON has no NaN or infinity: undefined figures (r2 of a constant column) become null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _law_predictions(fits: list[tuple[Problem, LawFit]], points: list[dict[str, float]]) -> list[dict]:
    out = []
    for point in points:
        for problem, fit in fits:
            inputs = problem.form.inputs
            unknown = sorted(set(point) - set(inputs) - set(problem.ignored))
            missing = [c for c in inputs if c not in point]
            if unknown or missing:
                raise CptError(f"--predict needs exactly the columns {', '.join(inputs)}; "
                               f"missing {missing or 'none'}, unknown {unknown or 'none'}", "fit")
            value = fit.form.predict(fit.theta, np.array([[point[c] for c in inputs]]))[0]
            entry = {**point, "value": float(value)}
            if len(fits) > 1:
                entry["output"] = problem.output
            out.append(entry)
    return out


def law_report(
    law: str, table: Table, options: FitOptions, points: list[dict[str, float]],
    tokens_from_flops: str | None = None, drop_highest: int = 0,
) -> tuple[dict, list[tuple[Problem, LawFit]]]:
    """Fit every problem of `law` on `table`; the report and the fits (for plots)."""
    fits = [(p, analyse(p.form, p.X, p.y, options)) for p in problems(law, table, tokens_from_flops, drop_highest)]
    params, ci, warnings = {}, {}, []
    for _, fit in fits:
        params.update(fit.params)
        ci.update(fit.ci)
        warnings += fit.warnings
    stats = scores(*(np.concatenate([getattr(f, name) for _, f in fits]) for name in ("y", "fitted", "loo")))
    report = {
        "law": law, "rows": len(fits[0][0].y), "huber_delta": options.huber_delta, "bootstrap": options.bootstrap,
        "params": params, "r2": stats["r2"], "mse": stats["mse"], "huber": sum(f.huber for _, f in fits),
        "ci": ci, "loo_error": stats["loo_error"], "predictions": _law_predictions(fits, points),
        "warnings": warnings,
    }
    return finite(report), fits


def cmr_report(
    table: Table, tol: Tolerance, options: FitOptions, points: list[dict[str, float]]
) -> tuple[dict, CmrResult]:
    """The critical mixture ratio of a sweep table; top-level figures describe the CMR law, if fitted."""
    for point in points:
        if set(point) != {"tokens"}:
            raise CptError(f"--predict for cmr takes tokens=T only, got {', '.join(point)}", "fit")
    result = critical_mixture_ratio(read_sweep(table), tol, options, str(table.path))
    law = result.law
    stats = scores(law.y, law.fitted, law.loo) if law else {"r2": None, "mse": None, "loo_error": None}
    report = {
        "law": "cmr", "rows": len(table), "huber_delta": options.huber_delta, "bootstrap": options.bootstrap,
        "params": law.params if law else {}, "r2": stats["r2"], "mse": stats["mse"],
        "huber": law.huber if law else None, "ci": law.ci if law else {}, "loo_error": stats["loo_error"],
        "predictions": [], "warnings": list(result.warnings), "cmr": result.to_json(),
    }
    report["predictions"] = [{**point, "value": cmr_ratio_at(report, point["tokens"])} for point in points]
    return finite(report), result
