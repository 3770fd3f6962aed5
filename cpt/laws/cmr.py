"""Critical mixture ratio (Gu et al. 2024): the largest domain share R that keeps general loss within tolerance.

R is the share of domain tokens in the continual pre-training mixture; 1 - R is replayed general
data. Mixing in more domain data lowers the domain loss and raises the general loss, so the
domain loss is minimised subject to L_gen(R, T) <= limit. Where the constraint is active (its
Lagrange multiplier positive, which it is whenever domain loss falls as R grows) the optimum sits
on the constraint's boundary: the critical point is the largest R with L_gen(R, T) = limit,
found by root finding on the fitted (or interpolated) general loss.

Two routes to L_gen(R, T), chosen by how much the sweep measured:
- fit: every ratio was evaluated at >= 6 token counts and >= 4 ratios are > 0. Per ratio the
  loss change over tokens is fitted, dL_gen(T) = a2*T**s2 + a3*T**s3 + b2 (first rising, then
  falling) and L_dom(T) = a1*T**s1 + b1 (the constant absorbs the base model's loss); at each
  token budget the smoothed losses are fitted over ratios, L(R) = alpha*R**s + beta (sign of s
  free), and that curve is solved for the limit.
- interpolation: otherwise, at each budget measured at >= 2 ratios, the general loss is linearly
  interpolated between the measured ratios (a single budget of final losses is this case).
The CMR is never extrapolated beyond the measured ratios: when even the smallest violates the
tolerance it is reported as 0 with a warning. Across budgets the CMR law R(T) = a*T**s + b is
fitted when at least 4 budgets have a CMR strictly inside the measured ratios.

The tolerance is either absolute, limit = baseline + epsilon (Gu et al. use epsilon = 0.05), or
relative, limit = baseline * (1 + P) (Que et al.'s D-CPT law example uses P = 3%).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import brentq

from cpt.errors import CptError
from cpt.laws.fitting import LawFit, analyse, fit_form
from cpt.laws.forms import RATIO_POWER, Array, power_sum
from cpt.laws.options import FitOptions
from cpt.laws.table import Table

MIN_CHECKPOINTS = 6  # a two-term tokens form has 5 parameters
MIN_RATIOS = 4  # a ratio-power form has 3
MIN_LAW_BUDGETS = 4  # the CMR law has 3
SCAN_POINTS = 2001


@dataclass(frozen=True)
class Tolerance:
    kind: str  # "absolute" | "relative"
    value: float
    baseline: float

    @property
    def limit(self) -> float:
        return self.baseline + self.value if self.kind == "absolute" else self.baseline * (1 + self.value)


def tolerance(baseline: float | None, epsilon: float | None, relative: float | None) -> Tolerance:
    """The tolerance the flags ask for: relative when P is given, else absolute (epsilon 0.05 by default)."""
    if baseline is None:
        raise CptError("--law cmr needs --baseline-general-loss (the base model's general loss)", "fit")
    if relative is not None:
        if not 0 < relative < 1:
            raise CptError(f"--relative-tolerance is a fraction in (0, 1), e.g. 0.03; got {relative}", "fit")
        return Tolerance("relative", relative, baseline)
    epsilon = 0.05 if epsilon is None else epsilon
    if not epsilon > 0:
        raise CptError(f"--epsilon must be > 0, got {epsilon}", "fit")
    return Tolerance("absolute", epsilon, baseline)


@dataclass(frozen=True)
class Sweep:
    ratio: Array
    tokens: Array
    general: Array
    domain: Array | None  # optional: only reported, never needed for the CMR


def read_sweep(table: Table) -> Sweep:
    ratio, tokens, general = table.column("ratio"), table.column("tokens"), table.column("general_loss")
    if np.any((ratio < 0) | (ratio > 1)):
        raise CptError("column 'ratio': the domain share must lie in [0, 1]", str(table.path))
    if np.any(tokens <= 0):
        raise CptError("column 'tokens': token counts must be > 0", str(table.path))
    return Sweep(ratio, tokens, general, table.column("domain_loss") if table.has("domain_loss") else None)


def largest_within(curve: Callable[[Array], Array], low: float, high: float, limit: float) -> float:
    """Largest R in [low, high] with curve(R) <= limit (a root of curve - limit); 0.0 when there is none."""
    grid = np.linspace(low, high, SCAN_POINTS)
    excess = curve(grid) - limit
    if excess[-1] <= 0:
        return float(high)
    feasible = np.flatnonzero(excess <= 0)
    if len(feasible) == 0:
        return 0.0
    i = feasible[-1]
    return float(brentq(lambda r: float(curve(np.array([r]))[0]) - limit, grid[i], grid[i + 1], xtol=1e-14))


@dataclass
class Budget:
    """The CMR at one token budget, with the points and curve it was solved on (for plots)."""

    tokens: float
    ratios: Array
    general: Array
    curve: Callable[[Array], Array]
    ratio: float
    domain_loss: float | None

    @property
    def inside(self) -> bool:
        """Whether the CMR lies strictly inside the measured ratios (not clipped at either end)."""
        return self.ratios.min() < self.ratio < self.ratios.max()

    def to_json(self) -> dict:
        out = {"tokens": self.tokens, "ratio": self.ratio}
        if self.ratio > 0:
            out["general_loss"] = float(self.curve(np.array([self.ratio]))[0])
        if self.domain_loss is not None:
            out["domain_loss"] = self.domain_loss
        return out


def _interpolator(ratios: Array, losses: Array) -> Callable[[Array], Array]:
    return lambda r: np.interp(r, ratios, losses)


def _fitted_curve(ratios: Array, losses: Array, options: FitOptions) -> Callable[[Array], Array]:
    theta, _ = fit_form(RATIO_POWER, ratios[:, None], losses, options.huber_delta, options.refine)
    return lambda r: RATIO_POWER.predict(theta, np.asarray(r, float)[:, None])


Curve = Callable[[Array], Array]


def _solve(
    tokens: float, ratios: Array, general: Array, domain: Array | None, curve_of: Callable[[Array, Array], Curve],
    limit: float,
) -> Budget:
    """The CMR at one budget, on the curve that `curve_of` draws through (ratio, loss) points."""
    general_curve = curve_of(ratios, general)
    ratio = largest_within(general_curve, ratios.min(), ratios.max(), limit)
    domain_loss = None if domain is None or ratio == 0 else float(curve_of(ratios, domain)(np.array([ratio]))[0])
    return Budget(tokens, ratios, general, general_curve, ratio, domain_loss)


def _mean_by(keys: Array, values: Array) -> tuple[Array, Array]:
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=values) / np.bincount(inverse)


def _shared_tokens(sweep: Sweep, ratios: Array) -> Array:
    """The measured token counts inside every ratio's measured range (no ratio's fit extrapolates)."""
    low = max(sweep.tokens[sweep.ratio == r].min() for r in ratios)
    high = min(sweep.tokens[sweep.ratio == r].max() for r in ratios)
    return np.unique(sweep.tokens[(sweep.tokens >= low) & (sweep.tokens <= high)])


def _fit_mode(sweep: Sweep) -> bool:
    ratios = np.unique(sweep.ratio[sweep.ratio > 0])
    return (
        len(ratios) >= MIN_RATIOS
        and all(len(np.unique(sweep.tokens[sweep.ratio == r])) >= MIN_CHECKPOINTS for r in ratios)
        and len(_shared_tokens(sweep, ratios)) > 0
    )


def _budgets_by_fit(sweep: Sweep, tol: Tolerance, options: FitOptions) -> list[Budget]:
    ratios = np.unique(sweep.ratio[sweep.ratio > 0])
    x_ref = float(np.exp(np.log(sweep.tokens).mean()))
    general_form = power_sum("general-vs-tokens", "tokens", ("a2", "s2", "a3", "s3", "b2"), x_ref)
    domain_form = power_sum("domain-vs-tokens", "tokens", ("a1", "s1", "b1"), x_ref)

    def over_tokens(form, r: float, losses: Array) -> Callable[[Array], Array]:
        rows = sweep.ratio == r
        X = sweep.tokens[rows, None]
        theta, _ = fit_form(form, X, losses[rows], options.huber_delta, options.refine)
        return lambda t: form.predict(theta, np.asarray(t, float)[:, None])

    general = [over_tokens(general_form, r, sweep.general - tol.baseline) for r in ratios]
    domain = None if sweep.domain is None else [over_tokens(domain_form, r, sweep.domain) for r in ratios]
    out = []
    for t in _shared_tokens(sweep, ratios):
        at = np.array([t])
        gen = tol.baseline + np.array([f(at)[0] for f in general])
        dom = None if domain is None else np.array([f(at)[0] for f in domain])
        out.append(_solve(float(t), ratios, gen, dom, lambda r, v: _fitted_curve(r, v, options), tol.limit))
    return out


def _budgets_by_interpolation(sweep: Sweep, tol: Tolerance) -> list[Budget]:
    out = []
    for t in np.unique(sweep.tokens):
        rows = sweep.tokens == t
        ratios, gen = _mean_by(sweep.ratio[rows], sweep.general[rows])
        if len(ratios) < 2:
            continue
        dom = None if sweep.domain is None else _mean_by(sweep.ratio[rows], sweep.domain[rows])[1]
        out.append(_solve(float(t), ratios, gen, dom, _interpolator, tol.limit))
    return out


@dataclass
class CmrResult:
    tolerance: Tolerance
    method: str  # "fit" | "interpolation"
    budgets: list[Budget]
    law: LawFit | None
    warnings: list[str] = field(default_factory=list)

    @property
    def critical_ratio(self) -> float:
        return self.budgets[-1].ratio

    def to_json(self) -> dict:
        tol = self.tolerance
        return {
            "tolerance": {"kind": tol.kind, "value": tol.value, "limit": tol.limit},
            "baseline_general_loss": tol.baseline,
            "method": self.method,
            "per_tokens": [b.to_json() for b in self.budgets],
            "law": None if self.law is None else self.law.params,
            "critical_ratio": self.critical_ratio,
        }


def critical_mixture_ratio(sweep: Sweep, tol: Tolerance, options: FitOptions, where: str) -> CmrResult:
    """The CMR at every token budget of the sweep, and the CMR law over budgets when there are enough."""
    method = "fit" if _fit_mode(sweep) else "interpolation"
    warnings = []
    if method == "fit" and np.any(sweep.ratio == 0):
        warnings.append("rows with ratio 0 are left out: the power-law forms need ratio > 0")
    budgets = _budgets_by_fit(sweep, tol, options) if method == "fit" else _budgets_by_interpolation(sweep, tol)
    if not budgets:
        raise CptError("no token budget was measured at two or more ratios; nothing to interpolate", where)
    for b in budgets:
        if b.ratio == 0:
            warnings.append(f"at {b.tokens:g} tokens even the smallest measured ratio exceeds the tolerance: CMR 0")
        elif b.ratio == b.ratios.max() and b.ratio < 1:
            warnings.append(f"at {b.tokens:g} tokens even the largest measured ratio stays within the tolerance: "
                            f"the CMR is at least {b.ratio:g}; measure larger ratios")
    usable = [b for b in budgets if b.inside]
    law = None
    if len(usable) >= MIN_LAW_BUDGETS:
        tokens = np.array([b.tokens for b in usable])
        form = power_sum("cmr", "tokens", ("a", "s", "b"), float(np.exp(np.log(tokens).mean())))
        law = analyse(form, tokens[:, None], np.array([b.ratio for b in usable]), options)
        warnings += law.warnings
    elif len(budgets) > 1:
        warnings.append(
            f"CMR law R(T) = a*T**s + b not fitted: it needs {MIN_LAW_BUDGETS} token budgets whose CMR lies "
            f"strictly inside the measured ratios, got {len(usable)}"
        )
    return CmrResult(tol, method, budgets, law, warnings)


def cmr_ratio_at(fit_json: dict, tokens: float) -> float:
    """The critical mixture ratio at `tokens` from the JSON of `cpt fit --law cmr --json`.

    Uses the fitted CMR law when there is one (clipped to [0, 1]); otherwise interpolates the
    per-budget ratios, and refuses to extrapolate beyond the measured budgets.
    """
    cmr = fit_json.get("cmr") if isinstance(fit_json, dict) else None
    if not isinstance(cmr, dict) or not cmr.get("per_tokens"):
        raise CptError("not the JSON of `cpt fit --law cmr` (no cmr.per_tokens)", "cmr")
    if not tokens > 0:
        raise CptError(f"tokens must be > 0, got {tokens}", "cmr")
    law = cmr.get("law")
    if law:
        return float(np.clip(law["a"] * tokens ** law["s"] + law["b"], 0.0, 1.0))
    points = sorted((p["tokens"], p["ratio"]) for p in cmr["per_tokens"])
    budgets, ratios = np.array(points).T
    if not budgets[0] <= tokens <= budgets[-1]:
        raise CptError(
            f"{tokens:g} tokens lies outside the measured budgets [{budgets[0]:g}, {budgets[-1]:g}] and no CMR law "
            "was fitted; choose a measured budget",
            "cmr",
        )
    return float(np.interp(tokens, budgets, ratios))


def mixture_text(fit_json: dict, tokens: float | None, source: Path) -> str:
    """A mixture file for `data_mixtures/` that replays 1 - CMR of the tokens (the domain gets the CMR).

    At `tokens` when given (see :func:`cmr_ratio_at`), else at the largest measured budget.
    """
    cmr = fit_json["cmr"]
    if tokens is None:
        tokens, ratio = cmr["per_tokens"][-1]["tokens"], cmr["critical_ratio"]
        origin = f"the {cmr['method']} at the sweep's largest budget"
    else:
        ratio = cmr_ratio_at(fit_json, tokens)
        origin = "the CMR law R(T) = a*T**s + b" if cmr["law"] else "interpolation between measured budgets"
    if ratio <= 0:
        raise CptError(f"the critical mixture ratio at {tokens:g} tokens is 0: no domain share keeps the general "
                       "loss within the tolerance, so there is no mixture to write", "fit")
    tol = cmr["tolerance"]
    header = [
        f"Written by `cpt fit --law cmr` from {source}.",
        f"Critical mixture ratio (Gu et al. 2024) at {tokens:g} tokens, from {origin}:",
        f"the domain's share R = {ratio!r} is the largest that keeps the general loss within the",
        f"{tol['kind']} tolerance {tol['value']!r} (limit {tol['limit']!r}, "
        + f"baseline general loss {cmr['baseline_general_loss']!r});",
        "the other 1 - R of the tokens replay the previous stage's data.",
    ]
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"replay": 1.0 - ratio})
