"""The law forms: each maps a batch of parameter vectors and the input columns to predicted losses.

Two choices shape every form here:
- A form takes parameters of shape (..., P) and returns (..., n), so the fitter scores a whole
  grid of starting points in one numpy call.
- Forms use only operations that stay analytic for complex parameters (exp, log, products), so
  the fitter gets exact gradients from the complex-step derivative (Squire & Trapp 1998)
  instead of hand-written Jacobians or noisy finite differences.

Forms whose terms are all positive are written in log space as a log-sum-exp of
log-coefficients, like Chinchilla's approach 3 as replicated by Besiroglu et al. 2024: the fit
then compares log losses, every coefficient stays positive, and the arithmetic cannot overflow.
Forms with free signs (``alpha * R**s + beta``) are fitted on the losses themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy.stats import qmc

Array = np.ndarray
LOG_COEF = (-30.0, 100.0)  # bounds of a log-coefficient: far beyond any loss scale, finite for L-BFGS-B
EXPONENT = (0.0, 5.0)  # decay exponents of positive power-law terms
FREE_EXPONENT = (-5.0, 5.0)
UNBOUNDED = (None, None)
SOBOL_STARTS = 4096


@dataclass(frozen=True)
class Form:
    """A law ready to fit: inputs, parameters, model, bounds and starting points.

    ``theta`` is the fitting parametrisation (log-coefficients in log-space forms, tokens in
    units of ``x_ref`` in power sums); ``natural`` turns it into the reported parameters.
    """

    name: str
    inputs: tuple[str, ...]  # columns of X, in order
    params: tuple[str, ...]  # names of the natural parameters, in the order `natural` returns
    log_space: bool  # the model returns log L and residuals are log y - model
    model: Callable[[Array, Array], Array]  # (theta (..., P), X (n, k)) -> (..., n)
    natural: Callable[[Array], Array]  # theta (..., P) -> natural parameters (..., P)
    bounds: tuple[tuple[float | None, float | None], ...]
    starts: Callable[[Array, Array], Array]  # (X, y) -> starting points (G, P)

    def predict(self, theta: Array, X: Array) -> Array:
        """Predicted losses (not logs) for the rows of X."""
        out = self.model(theta, X)
        return np.exp(out) if self.log_space else out


def _columns(theta: Array) -> list[Array]:
    """Parameter i of every vector in the batch, shaped (..., 1) to broadcast over data rows."""
    return [theta[..., i, None] for i in range(theta.shape[-1])]


def logsumexp(*terms: Array) -> Array:
    """log(sum(exp(term))) over the terms, shifted by the real maximum so it stays complex-analytic."""
    stacked = np.stack(np.broadcast_arrays(*terms))
    top = stacked.real.max(axis=0)
    return top + np.log(np.exp(stacked - top).sum(axis=0))


def product_grid(*axes) -> Array:
    return np.array(list(product(*axes)), dtype=float)


def sobol_box(low, high, n: int = SOBOL_STARTS, seed: int = 0) -> Array:
    """n quasi-random points covering a box evenly (a grid that scales to many dimensions)."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    points = qmc.Sobol(len(low), scramble=True, seed=seed).random(n)
    return low + points * (high - low)


# Chinchilla (Hoffmann et al. 2022, approach 3): L = E + A / N**a + B / D**b.


def _chinchilla(theta: Array, X: Array) -> Array:
    e, a, b, alpha, beta = _columns(theta)
    log_n, log_d = np.log(X[:, 0]), np.log(X[:, 1])
    return logsumexp(e, a - alpha * log_n, b - beta * log_d)


def _chinchilla_natural(theta: Array) -> Array:
    return np.concatenate([np.exp(theta[..., :3]), theta[..., 3:]], axis=-1)


def _chinchilla_starts(X: Array, y: Array) -> Array:
    # The grid of Besiroglu et al. 2024 (4,500 points): e, log A, log B, a, b.
    exps = np.arange(0, 2.01, 0.5)
    return product_grid(np.arange(-1, 1.01, 0.5), np.arange(0, 26, 5), np.arange(0, 26, 5), exps, exps)


CHINCHILLA = Form(
    name="chinchilla",
    inputs=("params", "tokens"),
    params=("E", "A", "B", "a", "b"),
    log_space=True,
    model=_chinchilla,
    natural=_chinchilla_natural,
    bounds=(LOG_COEF, LOG_COEF, LOG_COEF, EXPONENT, EXPONENT),
    starts=_chinchilla_starts,
)


# D-CPT (Que et al. 2024): L = E + A / N**alpha + B * r**eta / D**beta + C / (r + eps)**gamma.


def _dcpt(theta: Array, X: Array) -> Array:
    e, a, alpha, b, eta, beta, c, gamma, log_eps = _columns(theta)
    log_n, log_d, r = np.log(X[:, 0]), np.log(X[:, 1]), X[:, 2]
    return logsumexp(
        e, a - alpha * log_n, b + eta * np.log(r) - beta * log_d, c - gamma * np.log(r + np.exp(log_eps))
    )


_DCPT_LOG = (0, 1, 3, 6, 8)  # positions of E, A, B, C, eps in theta, fitted as logs


def _dcpt_natural(theta: Array) -> Array:
    out = np.array(theta, dtype=float, copy=True)
    out[..., _DCPT_LOG] = np.exp(out[..., _DCPT_LOG])
    return out


def _dcpt_starts(X: Array, y: Array) -> Array:
    e_top = float(np.log(y.min()))
    #          e           a    alpha  b   eta   beta  c     gamma log_eps
    low = [e_top - 2.0, 0.0, 0.0, 0.0, -1.0, 0.0, e_top - 4, 0.0, -7.0]
    high = [e_top, 25.0, 1.5, 25.0, 1.0, 1.5, e_top, 2.0, 0.0]
    return sobol_box(low, high)


DCPT = Form(
    name="dcpt",
    inputs=("params", "tokens", "ratio"),
    params=("E", "A", "alpha", "B", "eta", "beta", "C", "gamma", "eps"),
    log_space=True,
    model=_dcpt,
    natural=_dcpt_natural,
    bounds=(LOG_COEF, LOG_COEF, EXPONENT, LOG_COEF, FREE_EXPONENT, EXPONENT, LOG_COEF, EXPONENT, (-20.0, 3.0)),
    starts=_dcpt_starts,
)


# Data mixing law (Ye et al. 2024), one validation domain: L = c + k * exp(sum_j t_j * r_j).


def mixing_form(proportions: tuple[str, ...], output: str) -> Form:
    """The mixing law of one loss column over the given proportion columns."""

    def model(theta: Array, X: Array) -> Array:
        log_c, log_k = theta[..., 0, None], theta[..., 1, None]
        exponent = np.einsum("...j,nj->...n", theta[..., 2:], X)
        return logsumexp(log_c, log_k + exponent)

    def natural(theta: Array) -> Array:
        return np.concatenate([np.exp(theta[..., :2]), theta[..., 2:]], axis=-1)

    def starts(X: Array, y: Array) -> Array:
        floor, spread = float(np.log(y.min())), float(np.log(max(np.ptp(y), 1e-3)))
        m = len(proportions)
        return sobol_box([floor - 2, spread - 3] + [-5.0] * m, [floor, float(np.log(y.max()))] + [5.0] * m)

    return Form(
        name="mixing",
        inputs=proportions,
        params=(f"c[{output}]", f"k[{output}]", *(f"t[{output},{p}]" for p in proportions)),
        log_space=True,
        model=model,
        natural=natural,
        bounds=(LOG_COEF, LOG_COEF, *[(-20.0, 20.0)] * len(proportions)),
        starts=starts,
    )


# Sums of power laws with a constant: y = sum_k a_k * x**s_k + b (signs free).


def power_sum(name: str, input: str, params: tuple[str, ...], x_ref: float = 1.0) -> Form:
    """``params`` names (a_1, s_1, ..., a_m, s_m, b); the fit uses x / x_ref to stay well scaled.

    Starting points: a grid of exponents (ordered s_1 < s_2 < ... to skip relabelled twins),
    each completed by the least-squares coefficients for those exponents.
    """
    terms = (len(params) - 1) // 2
    log_ref = float(np.log(x_ref))

    def model(theta: Array, X: Array) -> Array:
        log_x = np.log(X[:, 0]) - log_ref
        out = theta[..., -1, None]
        for k in range(terms):
            out = out + theta[..., 2 * k, None] * np.exp(theta[..., 2 * k + 1, None] * log_x)
        return out

    def natural(theta: Array) -> Array:
        out = np.array(theta, dtype=float, copy=True)
        for k in range(terms):
            out[..., 2 * k] = theta[..., 2 * k] * np.exp(-theta[..., 2 * k + 1] * log_ref)
        return out

    def starts(X: Array, y: Array) -> Array:
        log_x = np.log(X[:, 0]) - log_ref
        axis = np.linspace(-2.0, 2.0, 41)
        exps = np.array([s for s in product(axis, repeat=terms) if all(np.diff(s) > 0)])  # (G, terms)
        design = np.concatenate([np.exp(exps[:, None, :] * log_x[None, :, None]), np.ones((len(exps), len(y), 1))], 2)
        coefs = np.einsum("gkn,n->gk", np.linalg.pinv(design), y)  # (G, terms + 1)
        theta = np.empty((len(exps), 2 * terms + 1))
        theta[:, 0:-1:2], theta[:, 1:-1:2], theta[:, -1] = coefs[:, :-1], exps, coefs[:, -1]
        return theta

    return Form(
        name=name,
        inputs=(input,),
        params=params,
        log_space=False,
        model=model,
        natural=natural,
        bounds=((UNBOUNDED, FREE_EXPONENT) * terms) + (UNBOUNDED,),
        starts=starts,
    )


# CMR scaling law, loss vs ratio at fixed tokens (Gu et al. 2024): L = alpha * R**s + beta.
RATIO_POWER = power_sum("ratio-power", "ratio", ("alpha", "s", "beta"))
