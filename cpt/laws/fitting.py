"""Robust fitting of a law form, done the way the Chinchilla replication showed is needed.

Besiroglu et al. 2024 traced Chinchilla's underfit parameters to the fit, not the data: the
recipe that works is a Huber loss with a small delta SUMMED over points (a mean shrinks the
objective until L-BFGS's tolerances stop it early), L-BFGS from a grid of starting points, the
best optimum kept, parameters never rounded, and bootstrap intervals. Here the whole grid is
scored in one vectorised call and L-BFGS-B runs from the best few starts only, which finds the
same optimum as running it from every start at a fraction of the cost (benchmarks/fit_speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber
from threadpoolctl import ThreadpoolController

from cpt.errors import CptError
from cpt.laws.forms import Array, Form
from cpt.laws.options import FitOptions

COMPLEX_STEP = 1e-20
FAILED = 1e300  # objective reported where the model is not finite
CHUNK_CELLS = 1 << 22  # grid rows x data rows scored per numpy call, to bound memory
WIDE_CI = 2.0  # a 95% interval wider than this many times |value| is reported as poorly constrained
LBFGS_OPTIONS = {"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15, "gtol": 1e-11}
# L-BFGS-B's tiny linear algebra goes through BLAS; threaded BLAS only adds contention there
# (tenfold slower on a busy 2-core machine), so each run is held to one BLAS thread.
BLAS = ThreadpoolController()


def target(form: Form, y: Array) -> Array:
    """What the model is compared with: log losses for log-space forms."""
    return np.log(y) if form.log_space else y


def objective(form: Form, thetas: Array, X: Array, y_target: Array, delta: float) -> Array:
    """Summed Huber loss of each parameter vector of thetas (G, P); inf where the model is not finite."""
    rows = max(1, CHUNK_CELLS // len(y_target))
    out = np.empty(len(thetas))
    with np.errstate(all="ignore"):
        for start in range(0, len(thetas), rows):
            residual = y_target - form.model(thetas[start : start + rows], X)
            out[start : start + rows] = huber(delta, residual).sum(axis=-1)
    out[~np.isfinite(out)] = np.inf
    return out


def _value_and_grad(theta: Array, form: Form, X: Array, y_target: Array, delta: float) -> tuple[float, Array]:
    """Objective and its exact gradient: the model's Jacobian comes from one complex-step batch."""
    probes = theta + 1j * COMPLEX_STEP * np.eye(len(theta))
    with np.errstate(all="ignore"):
        out = form.model(probes, X)  # (P, n); every real part is the model at theta
    residual = y_target - out[0].real
    jacobian = out.imag / COMPLEX_STEP
    value = float(huber(delta, residual).sum())
    grad = -(jacobian @ np.clip(residual, -delta, delta))
    if not (np.isfinite(value) and np.all(np.isfinite(grad))):
        return FAILED, np.zeros_like(theta)  # L-BFGS-B's line search backs off from here
    return value, grad


def minimize_from(form: Form, theta0: Array, X: Array, y_target: Array, delta: float) -> tuple[Array, float]:
    """One L-BFGS-B run from theta0 within the form's bounds."""
    with BLAS.limit(limits=1, user_api="blas"):
        res = minimize(
            _value_and_grad, theta0, args=(form, X, y_target, delta), jac=True, method="L-BFGS-B",
            bounds=form.bounds, options=LBFGS_OPTIONS,
        )
    return res.x, float(res.fun)


def clip_to_bounds(form: Form, thetas: Array) -> Array:
    low = np.array([-np.inf if lo is None else lo for lo, _ in form.bounds])
    high = np.array([np.inf if hi is None else hi for _, hi in form.bounds])
    return np.clip(thetas, low, high)


def fit_form(form: Form, X: Array, y: Array, delta: float, refine: int) -> tuple[Array, float]:
    """Score the form's grid of starts, run L-BFGS-B from the best `refine` of them, keep the best."""
    y_target = target(form, y)
    starts = clip_to_bounds(form, form.starts(X, y))
    scores = objective(form, starts, X, y_target, delta)
    best = None
    for i in np.argsort(scores, kind="stable")[:refine]:
        theta, value = minimize_from(form, starts[i], X, y_target, delta)
        if best is None or value < best[1]:
            best = (theta, value)
    if not best[1] < FAILED:
        raise CptError(f"{form.name}: no starting point gives finite losses on this table", "fit")
    return best


@dataclass
class LawFit:
    """One fitted form: parameters, their bootstrap intervals and how well the law predicts."""

    form: Form
    theta: Array
    huber: float
    y: Array
    fitted: Array  # in-sample predictions
    loo: Array  # leave-one-out predictions
    boot: Array  # natural parameters of every bootstrap refit (B, P); rows of NaN where a refit failed
    warnings: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, float]:
        return dict(zip(self.form.params, map(float, self.form.natural(self.theta))))

    @property
    def ci(self) -> dict[str, list[float]]:
        """Percentile 95% intervals over the bootstrap refits that succeeded."""
        boot = self.boot[np.isfinite(self.boot).all(axis=1)]
        if len(boot) == 0:
            return {}
        low, high = np.percentile(boot, [2.5, 97.5], axis=0)
        return {name: [float(lo), float(hi)] for name, lo, hi in zip(self.form.params, low, high)}


def scores(y: Array, fitted: Array, loo: Array) -> dict[str, float]:
    """r2 and mean squared error of the fit, root-mean-square leave-one-out error; in loss units."""
    ss_res = float(np.sum((y - fitted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "mse": ss_res / len(y),
        "loo_error": float(np.sqrt(np.mean((y - loo) ** 2))),
    }


def leave_one_out(form: Form, X: Array, y: Array, theta: Array, delta: float) -> Array:
    """Prediction for each row from a refit without it (started at the full fit's optimum)."""
    y_target = target(form, y)
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        theta_i, _ = minimize_from(form, theta, X[keep], y_target[keep], delta)
        out[i] = form.predict(theta_i, X[i : i + 1])[0]
    return out


def bootstrap(form: Form, X: Array, y: Array, theta: Array, options: FitOptions) -> Array:
    """Natural parameters refitted on rows resampled with replacement (seeded)."""
    rng = np.random.default_rng(options.seed)
    y_target = target(form, y)
    out = np.full((options.bootstrap, len(theta)), np.nan)
    for b in range(options.bootstrap):
        idx = rng.integers(0, len(y), len(y))
        theta_b, value = minimize_from(form, theta, X[idx], y_target[idx], options.huber_delta)
        if value < FAILED:
            out[b] = form.natural(theta_b)
    return out


def constraint_warnings(fit: LawFit) -> list[str]:
    """Parameters the data do not pin down: at a bound of the search, or with a very wide interval."""
    out = []
    for i, (name, value) in enumerate(fit.params.items()):
        for bound in fit.form.bounds[i]:
            if bound is not None and abs(fit.theta[i] - bound) <= 1e-6 * max(1.0, abs(bound)):
                out.append(f"{name} = {value!r} sits at a bound of its search range; the data do not constrain it")
        lo, hi = fit.ci.get(name, (value, value))
        if hi - lo > WIDE_CI * abs(value):
            out.append(
                f"{name} = {value!r} is poorly constrained: its 95% interval [{lo:.4g}, {hi:.4g}] is wider "
                f"than {WIDE_CI:g} times its value"
            )
    return out


def analyse(form: Form, X: Array, y: Array, options: FitOptions) -> LawFit:
    """The full treatment: best fit from the grid, leave-one-out error, bootstrap intervals, warnings."""
    theta, value = fit_form(form, X, y, options.huber_delta, options.refine)
    fit = LawFit(
        form=form,
        theta=theta,
        huber=value,
        y=y,
        fitted=form.predict(theta, X),
        loo=leave_one_out(form, X, y, theta, options.huber_delta),
        boot=bootstrap(form, X, y, theta, options) if options.bootstrap else np.empty((0, len(theta))),
    )
    fit.warnings = constraint_warnings(fit)
    return fit
