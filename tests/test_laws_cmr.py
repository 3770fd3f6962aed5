"""Critical mixture ratio logic: root finding, both tolerance conventions, the fit route, reading a fit back."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from cpt.errors import CptError
from cpt.laws.cmr import Sweep, cmr_ratio_at, critical_mixture_ratio, largest_within, mixture_text, tolerance
from cpt.laws.options import FitOptions

OPTIONS = FitOptions(refine=3, bootstrap=10)
BASE, P, T0 = 2.0, 0.7, 1e9
RATIOS = np.array([0.125, 0.25, 1 / 3, 0.5, 0.75, 1.0])  # Gu et al.'s ratios
TOKENS = T0 * np.geomspace(0.3, 5, 8)


def rise(T):
    """General-loss rise at ratio 1: up first, then back down a little (two power terms)."""
    x = T / T0
    return 0.3 * x**-0.3 - 0.2 * x**-0.6 + 0.05


def analytic_sweep() -> Sweep:
    """L_gen(R, T) = base + R**P * rise(T): a power law in R at every T, two-term in T at every R."""
    R, T = (g.ravel() for g in np.meshgrid(RATIOS, TOKENS, indexing="ij"))
    return Sweep(R, T, BASE + R**P * rise(T), 3.0 - 0.5 * R**0.5 * (T / T0) ** 0.2)


def test_largest_within_finds_the_last_crossing():
    assert largest_within(lambda r: 2 + r**2, 0.0, 1.0, 2.25) == pytest.approx(0.5, abs=1e-12)
    assert largest_within(lambda r: 2 + 0 * r, 0.0, 1.0, 2.25) == 1.0  # all within: the largest measured ratio
    assert largest_within(lambda r: 3 + r, 0.1, 1.0, 2.25) == 0.0  # none within

    def wave(r):  # within the limit, above it, within again: the answer is the last crossing
        return 2 + np.sin(6 * np.pi * r) / 10

    assert largest_within(wave, 0.0, 0.75, 2.05) == pytest.approx(2 / 3 + 1 / 36, abs=1e-9)


def test_tolerance_conventions():
    absolute, relative = tolerance(2.0, None, None), tolerance(2.0, None, 0.03)
    assert (absolute.kind, absolute.value, absolute.limit) == ("absolute", 0.05, 2.05)  # Gu et al.'s epsilon
    assert (relative.kind, relative.limit) == ("relative", pytest.approx(2.06))  # Que et al.'s 3%
    with pytest.raises(CptError, match="fraction"):
        tolerance(2.0, None, 3.0)
    with pytest.raises(CptError, match="baseline"):
        tolerance(None, 0.05, None)


def test_fit_route_recovers_the_analytic_cmr_at_every_budget():
    result = critical_mixture_ratio(analytic_sweep(), tolerance(BASE, 0.05, None), OPTIONS, "sweep.csv")
    assert result.method == "fit"
    expected = (0.05 / rise(TOKENS)) ** (1 / P)  # solves BASE + R**P * rise(T) = BASE + 0.05
    assert [b.tokens for b in result.budgets] == pytest.approx(TOKENS)
    assert [b.ratio for b in result.budgets] == pytest.approx(expected, abs=2e-3)
    last = result.budgets[-1]
    assert last.domain_loss == pytest.approx(3.0 - 0.5 * last.ratio**0.5 * 5**0.2, abs=2e-3)
    report = {"cmr": result.to_json()}
    assert report["cmr"]["critical_ratio"] == last.ratio
    law = report["cmr"]["law"]
    assert set(law) == {"a", "s", "b"}
    assert cmr_ratio_at(report, 2e9) == pytest.approx(law["a"] * 2e9 ** law["s"] + law["b"])
    assert cmr_ratio_at(report, 2e9) == pytest.approx(np.interp(2e9, TOKENS, expected), abs=0.01)


def test_relative_tolerance_is_the_same_limit_expressed_as_a_share():
    absolute = critical_mixture_ratio(analytic_sweep(), tolerance(BASE, 0.05, None), OPTIONS, "s")
    relative = critical_mixture_ratio(analytic_sweep(), tolerance(BASE, None, 0.025), OPTIONS, "s")
    assert relative.to_json()["tolerance"] == {"kind": "relative", "value": 0.025, "limit": pytest.approx(2.05)}
    assert [b.ratio for b in relative.budgets] == pytest.approx([b.ratio for b in absolute.budgets], abs=1e-9)


def test_few_checkpoints_interpolate_each_budget_and_skip_the_law():
    R = np.array([0.25, 0.5, 1.0, 0.25, 0.5, 1.0])
    T = np.array([1e9, 1e9, 1e9, 2e9, 2e9, 2e9])
    general = np.array([2.02, 2.04, 2.10, 2.01, 2.03, 2.06])
    result = critical_mixture_ratio(Sweep(R, T, general, None), tolerance(2.0, 0.05, None), OPTIONS, "s")
    assert result.method == "interpolation" and result.law is None
    assert [b.ratio for b in result.budgets] == pytest.approx([0.5 + 0.5 * 0.01 / 0.06, 0.5 + 0.5 * 0.02 / 0.03])
    assert any("CMR law" in w and "not fitted" in w for w in result.warnings)
    report = {"cmr": result.to_json()}
    assert cmr_ratio_at(report, 1.5e9) == pytest.approx(np.mean([b.ratio for b in result.budgets]))
    with pytest.raises(CptError, match="outside the measured budgets"):
        cmr_ratio_at(report, 3e9)


def test_a_tolerance_that_never_binds_is_reported_as_a_lower_bound():
    R = np.array([0.25, 0.5, 0.75])
    general = np.array([2.00, 2.01, 2.02])
    result = critical_mixture_ratio(Sweep(R, np.full(3, 1e9), general, None), tolerance(2.0, 0.05, None), OPTIONS, "s")
    assert result.critical_ratio == 0.75
    assert any("largest measured ratio stays within the tolerance" in w and "at least 0.75" in w for w in result.warnings)
    full = critical_mixture_ratio(Sweep(np.array([0.5, 1.0]), np.full(2, 1e9), general[:2], None),
                                  tolerance(2.0, 0.05, None), OPTIONS, "s")
    assert full.critical_ratio == 1.0 and not any("at least" in w for w in full.warnings)  # R = 1 is a real answer


def test_cmr_law_is_clipped_to_a_share_and_bad_json_is_refused():
    report = {"cmr": {"law": {"a": 1e-3, "s": 0.5, "b": 0.1}, "per_tokens": [{"tokens": 1e9, "ratio": 0.4}]}}
    assert cmr_ratio_at(report, 1e4) == pytest.approx(1e-3 * 1e2 + 0.1)
    assert cmr_ratio_at(report, 1e12) == 1.0
    with pytest.raises(CptError, match="not the JSON"):
        cmr_ratio_at({"law": "chinchilla", "params": {}}, 1e9)


def test_mixture_text_at_chosen_tokens_uses_the_law():
    report = {"cmr": {"law": {"a": 0.0, "s": 1.0, "b": 0.3}, "per_tokens": [{"tokens": 1e9, "ratio": 0.4}],
                      "critical_ratio": 0.4, "method": "fit", "baseline_general_loss": 2.0,
                      "tolerance": {"kind": "relative", "value": 0.03, "limit": 2.06}}}
    text = mixture_text(report, 5e9, Path("sweep.csv"))
    assert yaml.safe_load(text) == {"replay": pytest.approx(0.7)}
    assert "5e+09 tokens, from the CMR law" in text and "relative tolerance 0.03" in text
    assert yaml.safe_load(mixture_text(report, None, Path("s")))["replay"] == pytest.approx(0.6)


def test_cmr_law_recovered_from_budgets_whose_cmr_follows_it():
    """General loss linear in R (so interpolation is exact) with its crossing placed on a known CMR law."""
    a, s, b, eps = 2e-3, 0.25, 0.05, 0.05
    budgets = np.array([1e8, 3e8, 1e9, 3e9, 1e10])  # five checkpoints per ratio: the interpolation route
    R, T = (g.ravel() for g in np.meshgrid([0.1, 0.3, 0.5, 0.7, 0.9], budgets, indexing="ij"))
    general = BASE + eps * R / (a * T**s + b)
    result = critical_mixture_ratio(Sweep(R, T, general, None), tolerance(BASE, eps, None), OPTIONS, "s")
    assert result.method == "interpolation"
    assert [x.ratio for x in result.budgets] == pytest.approx(a * budgets**s + b, rel=1e-9)
    assert result.law.params == pytest.approx({"a": a, "s": s, "b": b}, rel=1e-4)
    assert cmr_ratio_at({"cmr": result.to_json()}, 2e10) == pytest.approx(a * 2e10**s + b, rel=1e-4)
