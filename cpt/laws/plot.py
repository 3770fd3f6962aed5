"""PNG pictures of a fit: the data with the fitted curves, and the critical mixture ratio over tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpt.io import write_with
from cpt.laws.cmr import CmrResult
from cpt.laws.fitting import LawFit
from cpt.laws.problems import Problem

CURVES = 5  # curves per panel: quantiles of the input that is not on the x axis
LOG_AXES = ("params", "tokens")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _axis_and_group(inputs: tuple[str, ...]) -> tuple[int, int | None]:
    """The input on the x axis (tokens when there is one) and the one that tells the curves apart."""
    axis = inputs.index("tokens") if "tokens" in inputs else 0
    others = [name for name in inputs if name != inputs[axis]]
    group = "ratio" if "ratio" in others else (others[0] if others else None)
    return axis, None if group is None else inputs.index(group)


def _draw_law(ax, problem: Problem, fit: LawFit, color=None) -> None:
    """Data and fitted curves along one input, the others held at their medians.

    With no fixed colour (a single loss column), one curve per quantile of the group input,
    points coloured by it; otherwise one curve in the given colour.
    """
    import matplotlib.pyplot as plt

    form, X, y = problem.form, problem.X, problem.y
    axis, group = _axis_and_group(form.inputs)
    log_x = form.inputs[axis] in LOG_AXES
    xs = (np.geomspace if log_x else np.linspace)(X[:, axis].min(), X[:, axis].max(), 200)
    base = np.tile(np.median(X, axis=0), (len(xs), 1))
    base[:, axis] = xs
    if color is not None or group is None:
        color = color if color is not None else "C0"
        ax.scatter(X[:, axis], y, s=12, color=color, label=f"{problem.output} (data)")
        ax.plot(xs, form.predict(fit.theta, base), color=color, label=f"{problem.output} (fit)")
    else:
        values = X[:, group]
        shade = plt.get_cmap("viridis")
        to_shade = np.log if form.inputs[group] in LOG_AXES else np.asarray

        def scale(v):
            return (to_shade(v) - to_shade(values.min())) / max(np.ptp(to_shade(values)), 1e-300)

        ax.scatter(X[:, axis], y, s=12, c=shade(scale(values)), label=f"data (colour: {form.inputs[group]})")
        for level in np.unique(np.quantile(values, np.linspace(0, 1, CURVES))):
            grid = base.copy()
            grid[:, group] = level
            ax.plot(xs, form.predict(fit.theta, grid), color=shade(scale(level)),
                    label=f"fit, {form.inputs[group]} = {level:.3g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(form.inputs[axis])


def write_fit_png(law: str, fits: list[tuple[Problem, LawFit]], path: Path) -> None:
    """Left: data and fitted curves. Right: fitted against observed loss (on the diagonal when the law fits)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (problem, fit) in enumerate(fits):
        color = None if len(fits) == 1 else f"C{i % 10}"
        _draw_law(left, problem, fit, color)
        right.scatter(problem.y, fit.fitted, s=12, color=color or "C0", label=problem.output)
    left.set_ylabel("loss")
    left.set_title(f"{law}: data and fitted law")
    left.legend(fontsize="small")
    observed = np.concatenate([p.y for p, _ in fits])
    lims = [observed.min(), observed.max()]
    right.plot(lims, lims, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("observed loss")
    right.set_ylabel("fitted loss")
    right.set_title("fitted vs observed")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_cmr_png(result: CmrResult, path: Path) -> None:
    """Left: general loss over ratios at a few budgets, the limit and each CMR. Right: CMR over tokens."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    budgets = result.budgets
    shown = sorted({round(i) for i in np.linspace(0, len(budgets) - 1, min(len(budgets), 6))})
    for j, i in enumerate(shown):
        b = budgets[i]
        color = plt.get_cmap("viridis")(j / max(len(shown) - 1, 1))
        rs = np.linspace(b.ratios.min(), b.ratios.max(), 200)
        left.scatter(b.ratios, b.general, s=14, color=color)
        left.plot(rs, b.curve(rs), color=color, label=f"{b.tokens:.3g} tokens: CMR {b.ratio:.3f}")
        if b.ratio > 0:
            left.axvline(b.ratio, color=color, linestyle=":", linewidth=1)
    left.axhline(result.tolerance.limit, color="red", linestyle="--", linewidth=1, label="tolerance limit")
    left.set_xlabel("domain ratio R")
    left.set_ylabel("general loss")
    left.set_title(f"general loss vs ratio ({result.method})")
    left.legend(fontsize="small")
    tokens = np.array([b.tokens for b in budgets])
    right.scatter(tokens, [b.ratio for b in budgets], s=14, label="CMR per budget")
    if result.law is not None:
        ts = np.geomspace(tokens.min(), tokens.max(), 200)
        right.plot(ts, result.law.form.predict(result.law.theta, ts[:, None]), label="R(T) = a*T**s + b")
    right.set_xscale("log")
    right.set_xlabel("tokens")
    right.set_ylabel("critical mixture ratio")
    right.set_title("CMR against tokens")
    right.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
