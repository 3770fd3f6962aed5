"""Law forms against their textbook formulas, and the fitter's exact gradients against finite differences."""

import numpy as np
import pytest

from cpt.laws.fitting import _value_and_grad, fit_form, objective, target
from cpt.laws.forms import CHINCHILLA, DCPT, RATIO_POWER, mixing_form, power_sum

RNG = np.random.default_rng(0)
N = np.geomspace(1e7, 1e10, 6)
D = np.geomspace(1e8, 1e11, 6)
R = np.linspace(0.05, 1.0, 6)


def test_chinchilla_is_the_sum_of_its_terms():
    E, A, B, a, b = 1.7, 400.0, 1000.0, 0.34, 0.28
    theta = np.array([np.log(E), np.log(A), np.log(B), a, b])
    X = np.stack([N, D], 1)
    assert CHINCHILLA.predict(theta, X) == pytest.approx(E + A / N**a + B / D**b, rel=1e-12)
    assert CHINCHILLA.natural(theta) == pytest.approx([E, A, B, a, b])


def test_dcpt_is_the_sum_of_its_terms():
    E, A, alpha, B, eta, beta, C, gamma, eps = 1.5, 300.0, 0.3, 500.0, 0.2, 0.3, 0.2, 0.6, 0.05
    theta = np.array([np.log(E), np.log(A), alpha, np.log(B), eta, beta, np.log(C), gamma, np.log(eps)])
    X = np.stack([N, D, R], 1)
    expected = E + A / N**alpha + B * R**eta / D**beta + C / (R + eps) ** gamma
    assert DCPT.predict(theta, X) == pytest.approx(expected, rel=1e-12)
    assert DCPT.natural(theta) == pytest.approx([E, A, alpha, B, eta, beta, C, gamma, eps])


def test_mixing_law_and_its_parameter_names():
    form = mixing_form(("r_web", "r_code"), "web_loss")
    X = RNG.dirichlet([1, 1, 1], 8)[:, :2]
    theta = np.array([np.log(2.0), np.log(1.5), -2.0, 0.5])
    assert form.predict(theta, X) == pytest.approx(2.0 + 1.5 * np.exp(-2.0 * X[:, 0] + 0.5 * X[:, 1]), rel=1e-12)
    assert form.params == ("c[web_loss]", "k[web_loss]", "t[web_loss,r_web]", "t[web_loss,r_code]")


def test_power_sum_reports_coefficients_for_unscaled_inputs():
    """Fitted on x / x_ref, reported for x itself: a * (x/x_ref)**s == a_natural * x**s."""
    form = power_sum("general", "tokens", ("a2", "s2", "a3", "s3", "b2"), x_ref=1e9)
    theta = np.array([0.3, -0.3, -0.2, -0.6, 0.05])
    T = np.geomspace(3e8, 5e9, 7)
    a2, s2, a3, s3, b2 = form.natural(theta)
    assert form.predict(theta, T[:, None]) == pytest.approx(a2 * T**s2 + a3 * T**s3 + b2, rel=1e-12)
    assert (s2, s3) == (-0.3, -0.6)


@pytest.mark.parametrize("form, X, theta", [
    (CHINCHILLA, np.stack([N, D], 1), np.array([0.5, 6.0, 7.0, 0.34, 0.28])),
    (DCPT, np.stack([N, D, R], 1), np.array([0.4, 5.7, 0.3, 6.2, 0.2, 0.3, -1.6, 0.6, -3.0])),
    (RATIO_POWER, R[:, None], np.array([-0.8, 0.3, 3.0])),
])
def test_complex_step_gradient_matches_finite_differences(form, X, theta):
    y = form.predict(theta + 0.01, X) * np.exp(RNG.normal(0, 0.01, len(X)))
    y_target, delta = target(form, y), 0.05  # a delta above the residuals: smooth, so differences are exact
    _, grad = _value_and_grad(theta, form, X, y_target, delta)
    step = 1e-6
    numeric = [
        (_value_and_grad(theta + step * e, form, X, y_target, delta)[0]
         - _value_and_grad(theta - step * e, form, X, y_target, delta)[0]) / (2 * step)
        for e in np.eye(len(theta))
    ]
    assert grad == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_grid_objective_is_the_summed_huber_loss():
    """Summed, not averaged: a mean would shrink the objective and stop L-BFGS early."""
    X, theta = R[:, None], np.array([-0.8, 0.3, 3.0])
    y = RATIO_POWER.predict(theta, X) + np.array([0.0, 0.0005, -0.002, 0.01, 0.0, -0.0001])
    delta = 0.001
    r = y - RATIO_POWER.predict(theta, X)
    expected = np.where(np.abs(r) <= delta, r**2 / 2, delta * (np.abs(r) - delta / 2)).sum()
    assert objective(RATIO_POWER, np.stack([theta, theta + 1]), X, y, delta)[0] == pytest.approx(expected)


def test_fit_recovers_exact_data_with_a_negative_exponent():
    theta = np.array([0.5, -0.4, 2.0])  # loss falls as the ratio grows: s < 0 must be reachable
    X = R[:, None]
    fitted, value = fit_form(RATIO_POWER, X, RATIO_POWER.predict(theta, X), delta=1e-3, refine=3)
    assert fitted == pytest.approx(theta, abs=1e-6) and value < 1e-12
