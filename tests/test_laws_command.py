"""`cpt fit` end to end: synthetic recovery for every law, the Chinchilla reference, CMR contracts, bad input."""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpt.config.mixture import MixtureConfig
from cpt.errors import CptError
from cpt.laws.command import add_fit_parser, cmd_fit
from cpt.laws.options import LAWS
from cpt.laws.problems import SINGLE

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = ["--bootstrap", "40", "--lbfgs-starts", "5"]


def fit_main(argv: list[str]) -> int:
    """`cpt fit ...` through cpt.cli once the lead has registered it, else through the same wiring."""
    from cpt import cli

    if "fit" in cli.COMMANDS:
        return cli.main(["fit", *argv])
    parser = argparse.ArgumentParser(prog="cpt")
    add_fit_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return cmd_fit(parser.parse_args(["fit", *argv]))
    except CptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_fit(capsys, *argv):
    code = fit_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fit_json(capsys, *argv) -> dict:
    code, out, err = run_fit(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def write_csv(path: Path, columns: dict) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))
    return path


def assert_recovered(report: dict, truth: dict) -> None:
    """Every true parameter lies inside its bootstrap 95% interval."""
    assert set(report["params"]) == set(truth) == set(report["ci"])
    outside = {k: (v, report["ci"][k]) for k, v in truth.items() if not report["ci"][k][0] <= v <= report["ci"][k][1]}
    assert not outside, outside
    assert report["r2"] > 0.99 and report["loo_error"] > 0


# Synthetic recovery: data drawn from known parameters with noise, recovered within the 95% intervals.
# A 95% interval misses now and then by design; the seeds are draws whose true values sit well inside
# (at least a fifth of the width from either end), so that floating-point detail cannot flip them.


def test_chinchilla_synthetic_recovery_and_prediction(capsys, tmp_path):
    rng = np.random.default_rng(1)
    truth = {"E": 1.7, "A": 400.0, "B": 1000.0, "a": 0.34, "b": 0.3}
    N, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e9, 7), np.geomspace(1e8, 1e10, 7)))
    loss = (truth["E"] + truth["A"] / N ** truth["a"] + truth["B"] / D ** truth["b"]) * np.exp(rng.normal(0, 0.005, N.size))
    table = write_csv(tmp_path / "runs.csv", {"n": N, "tokens": D, "loss": loss})
    report = fit_json(capsys, table, "--law", "chinchilla", "--col", "params=n", *FAST,
                      "--predict", "params=7e10,tokens=1.4e12")
    assert_recovered(report, truth)
    p = report["params"]
    (prediction,) = report["predictions"]
    assert prediction["params"] == 7e10 and prediction["tokens"] == 1.4e12
    assert prediction["value"] == pytest.approx(p["E"] + p["A"] / 7e10 ** p["a"] + p["B"] / 1.4e12 ** p["b"], rel=1e-9)
    assert set(report) >= {"law", "params", "r2", "mse", "huber", "ci", "loo_error", "predictions", "warnings"}


def test_ratio_power_synthetic_recovery_with_negative_alpha(capsys, tmp_path):
    rng = np.random.default_rng(0)
    truth = {"alpha": -0.8, "s": 0.3, "beta": 3.0}  # Gu et al.'s own fits have s > 0 and alpha < 0
    ratio = np.repeat([0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0], 2)
    loss = truth["alpha"] * ratio ** truth["s"] + truth["beta"] + rng.normal(0, 0.005, ratio.size)
    table = write_csv(tmp_path / "ratios.csv", {"ratio": ratio, "loss": loss})
    assert_recovered(fit_json(capsys, table, "--law", "ratio-power", *FAST), truth)


def test_dcpt_synthetic_recovery(capsys, tmp_path):
    rng = np.random.default_rng(1)
    truth = {"E": 1.5, "A": 300.0, "alpha": 0.3, "B": 500.0, "eta": 0.2, "beta": 0.3, "C": 0.2, "gamma": 0.6, "eps": 0.05}
    N, D, r = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e10, 4), np.geomspace(1e7, 1e11, 4),
                                                [0.02, 0.1, 0.4, 1.0]))
    t = truth
    loss = (t["E"] + t["A"] / N ** t["alpha"] + t["B"] * r ** t["eta"] / D ** t["beta"]
            + t["C"] / (r + t["eps"]) ** t["gamma"]) * np.exp(rng.normal(0, 0.003, N.size))
    table = write_csv(tmp_path / "dcpt.csv", {"params": N, "tokens": D, "ratio": r, "loss": loss})
    assert_recovered(fit_json(capsys, table, "--law", "dcpt", "--bootstrap", "30", "--lbfgs-starts", "3"), truth)


def test_mixing_synthetic_recovery_one_law_per_loss_column(capsys, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.dirichlet([1, 1, 1], 40)
    web = 2.0 + 1.5 * np.exp(-2.0 * w[:, 0] + 0.5 * w[:, 1])
    code = 1.0 + 0.8 * np.exp(1.0 * w[:, 0] - 3.0 * w[:, 1])
    noise = np.exp(rng.normal(0, 0.003, (2, 40)))
    table = write_csv(tmp_path / "mix.csv", {"r_web": w[:, 0], "r_code": w[:, 1], "math_share": w[:, 2],
                                             "web_loss": web * noise[0], "code_loss": code * noise[1]})
    report = fit_json(capsys, table, "--law", "mixing", "--col", "r_math=math_share", *FAST,
                      "--predict", "r_web=0.2,r_code=0.3,r_math=0.5")
    # Proportions sum to 1, so r_math is the reference domain: its exponent is 0 and not fitted.
    assert_recovered(report, {
        "c[web_loss]": 2.0, "k[web_loss]": 1.5, "t[web_loss,r_web]": -2.0, "t[web_loss,r_code]": 0.5,
        "c[code_loss]": 1.0, "k[code_loss]": 0.8, "t[code_loss,r_web]": 1.0, "t[code_loss,r_code]": -3.0,
    })
    values = {p["output"]: p["value"] for p in report["predictions"]}
    assert values["web_loss"] == pytest.approx(2.0 + 1.5 * np.exp(-2.0 * 0.2 + 0.5 * 0.3), rel=0.01)
    assert values["code_loss"] == pytest.approx(1.0 + 0.8 * np.exp(1.0 * 0.2 - 3.0 * 0.3), rel=0.01)


def test_chinchilla_reference_check(capsys):
    """Besiroglu et al. 2024's replication on Epoch AI's extraction of the Chinchilla runs."""
    report = fit_json(capsys, SHARED_DATA / "chinchilla_svg_extracted.csv", "--law", "chinchilla",
                      "--col", "params=Model Size", "--tokens-from-flops", "Training FLOP", "--drop-highest", "5",
                      "--bootstrap", "10")
    p = report["params"]
    assert report["rows"] == 240
    assert p["E"] == pytest.approx(1.817, abs=0.01)
    assert 470 <= p["A"] <= 490
    assert 2040 <= p["B"] <= 2160
    assert p["a"] == pytest.approx(0.3475, abs=0.005)
    assert p["b"] == pytest.approx(0.366, abs=0.005)


def test_text_output_and_png(capsys, tmp_path):
    ratio = np.array([0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    table = write_csv(tmp_path / "r.csv", {"ratio": ratio, "loss": 2.5 - 0.3 * ratio**0.5})
    png = tmp_path / "fit.png"
    code, out, err = run_fit(capsys, table, "--law", "ratio-power", "--bootstrap", "5", "--png", png)
    assert code == 0, err
    assert "alpha = " in out and "95% CI" in out and f"wrote {png}" in out
    assert png.stat().st_size > 10_000


# Critical mixture ratio: a hand-made single-budget table with known answers.

SINGLE_BUDGET = {
    "ratio": [0.0, 0.25, 0.5, 0.75, 1.0],
    "tokens": [1e9] * 5,
    "general_loss": [2.00, 2.02, 2.06, 2.12, 2.20],
    "domain_loss": [3.0, 2.8, 2.6, 2.5, 2.45],
}


@pytest.mark.parametrize("flags, kind, limit, ratio", [
    ([], "absolute", 2.05, 0.25 + 0.25 * 0.03 / 0.04),  # default epsilon 0.05
    (["--epsilon", "0.1"], "absolute", 2.10, 0.5 + 0.25 * 0.04 / 0.06),
    (["--relative-tolerance", "0.04"], "relative", 2.08, 0.5 + 0.25 * 0.02 / 0.06),
])
def test_cmr_single_budget_interpolates_the_largest_ratio_within_tolerance(capsys, tmp_path, flags, kind, limit, ratio):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    write_csv(sweep / "sweep.csv", SINGLE_BUDGET)
    report = fit_json(capsys, sweep, "--law", "cmr", "--baseline-general-loss", "2.0", *flags,
                      "--predict", "tokens=1e9")
    cmr = report["cmr"]
    assert cmr["tolerance"]["kind"] == kind and cmr["tolerance"]["limit"] == pytest.approx(limit)
    assert cmr["baseline_general_loss"] == 2.0 and cmr["method"] == "interpolation" and cmr["law"] is None
    (budget,) = cmr["per_tokens"]
    assert budget["tokens"] == 1e9
    assert budget["ratio"] == pytest.approx(ratio, abs=1e-9) == cmr["critical_ratio"]
    assert budget["general_loss"] == pytest.approx(limit)
    assert budget["domain_loss"] == pytest.approx(np.interp(ratio, SINGLE_BUDGET["ratio"], SINGLE_BUDGET["domain_loss"]))
    assert report["predictions"] == [{"tokens": 1e9, "value": pytest.approx(ratio, abs=1e-9)}]


def test_cmr_writes_a_mixture_that_replays_the_rest(capsys, tmp_path):
    table = write_csv(tmp_path / "final.csv", SINGLE_BUDGET)
    mixture = tmp_path / "data_mixtures" / "finance-cmr.yaml"
    code, _, err = run_fit(capsys, table, "--law", "cmr", "--baseline-general-loss", "2.0",
                           "--write-mixture", mixture)
    assert code == 0, err
    text = mixture.read_text()
    assert "absolute tolerance 0.05" in text and "1e+09 tokens" in text and "Gu et al. 2024" in text
    loaded = yaml.safe_load(text)
    assert loaded["replay"] == pytest.approx(1 - 0.4375, abs=1e-12)
    assert MixtureConfig.model_validate(loaded).replay == loaded["replay"]


def test_cmr_of_zero_warns_and_writes_no_mixture(capsys, tmp_path):
    table = write_csv(tmp_path / "final.csv", SINGLE_BUDGET)
    report = fit_json(capsys, table, "--law", "cmr", "--baseline-general-loss", "1.9")
    assert report["cmr"]["critical_ratio"] == 0.0 and any("CMR 0" in w for w in report["warnings"])
    mixture = tmp_path / "zero.yaml"
    code, _, err = run_fit(capsys, table, "--law", "cmr", "--baseline-general-loss", "1.9", "--write-mixture", mixture)
    assert code == 2 and "no mixture to write" in err and not mixture.exists()


# Bad input: one line on stderr, exit code 2, nothing on stdout.

GOOD = {"ratio": [0.1, 0.2, 0.4, 0.6, 0.8], "loss": [2.0, 2.1, 2.2, 2.3, 2.4]}


@pytest.mark.parametrize("columns, argv, message", [
    (GOOD, ["--law", "chinchilla"], "no column 'params'"),
    ({**GOOD, "loss": [2.0, "nan", 2.2, 2.3, 2.4]}, ["--law", "ratio-power"], "line 3: 'nan' is not a finite number"),
    ({**GOOD, "loss": [2.0, "", 2.2, 2.3, 2.4]}, ["--law", "ratio-power"], "line 3: '' is not a finite number"),
    ({"ratio": [0.1, 0.2, 0.4], "loss": [2.0, 2.1, 2.2]}, ["--law", "ratio-power"], "needs at least 4 rows, got 3"),
    (GOOD, ["--law", "kaplan"], "unknown law 'kaplan'"),
    (GOOD, ["--law", "ratio-power", "--col", "los=loss"], "ratio-power has no column 'los'"),
    (GOOD, ["--law", "ratio-power", "--col", "loss=missing"], "--col names columns that do not exist: missing"),
    ({**GOOD, "ratio": [0.0, 0.2, 0.4, 0.6, 0.8]}, ["--law", "ratio-power"], "ratio-power needs ratio > 0"),
    (GOOD, ["--law", "ratio-power", "--epsilon", "0.1"], "--epsilon: only for --law cmr"),
    (GOOD, ["--law", "ratio-power", "--predict", "ratio=0.5,tokens=3"], "unknown ['tokens']"),
    (GOOD, ["--law", "ratio-power", "--predict", "ratio"], "--predict expects COL=V"),
    (GOOD, ["--law", "ratio-power", "--drop-highest", "5"], "--drop-highest must be in [0, 5)"),
    (GOOD, ["--law", "ratio-power", "--tokens-from-flops", "loss"], "--tokens-from-flops needs a law with params"),
    (GOOD, ["--law", "ratio-power", "--huber-delta", "0"], "--huber-delta must be > 0"),
    (GOOD, ["--law", "mixing"], "mixing needs proportion columns named r_<domain>"),
    ({"ratio": [0.5, 0.5], "tokens": [1, 2], "general_loss": [2, 2]}, ["--law", "cmr", "--baseline-general-loss", "2"],
     "no token budget was measured at two or more ratios"),
    ({"ratio": [0.5, 0.6], "tokens": [1, 1], "general_loss": [2, 2]}, ["--law", "cmr"], "needs --baseline-general-loss"),
    # too few rows for each law's parameters
    ({"params": [1e6, 2e6, 4e6, 8e6], "tokens": [1e9, 1e9, 2e9, 4e9], "loss": [3.0, 2.9, 2.7, 2.5]},
     ["--law", "chinchilla"], "chinchilla has 5 parameters and needs at least 6 rows, got 4"),
    ({"params": [1e6, 2e6, 4e6, 8e6], "tokens": [1e9, 1e9, 2e9, 4e9], "ratio": [0.1, 0.2, 0.3, 0.4],
      "loss": [3.0, 2.9, 2.7, 2.5]}, ["--law", "dcpt"], "dcpt has 9 parameters and needs at least 10 rows, got 4"),
    ({"r_a": [0.2, 0.5, 0.8], "r_b": [0.8, 0.5, 0.2], "a_loss": [3.0, 2.8, 2.6], "b_loss": [2.0, 2.2, 2.4]},
     ["--law", "mixing"], "mixing has 3 parameters and needs at least 4 rows, got 3"),
    # a sweep table without its general loss, or with a hole in it
    ({"ratio": [0.5, 0.6], "tokens": [1, 1], "domain_loss": [2, 2]}, ["--law", "cmr", "--baseline-general-loss", "2"],
     "no column 'general_loss'"),
    ({"ratio": [0.5, 0.6], "tokens": [1, 1], "general_loss": [2, "nan"]},
     ["--law", "cmr", "--baseline-general-loss", "2"], "column 'general_loss', line 3: 'nan' is not a finite number"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, columns, argv, message):
    table = write_csv(tmp_path / "bad.csv", columns)
    code, out, err = run_fit(capsys, table, *argv, "--bootstrap", "0")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_every_law_the_command_offers_has_a_pipeline():
    assert set(LAWS) == {*SINGLE, "mixing", "cmr"}


def test_a_directory_without_sweep_csv_is_an_error(capsys, tmp_path):
    code, out, err = run_fit(capsys, tmp_path, "--law", "cmr", "--baseline-general-loss", "2")
    assert code == 2 and out == "" and "a directory without sweep.csv" in err and err.count("\n") == 1
