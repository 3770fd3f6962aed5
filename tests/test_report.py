"""`cpt report` / `cpt compare` on hand-made run directories (no training needed)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpt.errors import CptError
from cpt.report import add_report_parsers, cmd_compare, cmd_report
from cpt.report.runs import load_run, run_labels, stage_offsets
from cpt.report.series import mixture_shares, rolling_mean

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 64

PRETRAIN = {
    "name": "pretrain", "data": ["prose"], "steps": 10, "shares": {"prose": 1.0},
    "evals": {0: {"prose": 7.0}, 5: {"prose": 6.0}, 10: {"prose": 5.0}},
    "summary": {
        "stage": "pretrain", "steps": 10, "tokens": 640, "targeted": ["prose"], "other": [],
        "domains": {"prose": {"base_loss": 7.0, "final_loss": 5.0, "final_delta": -2.0, "max_delta": 0.0,
                              "max_delta_step": 0, "targeted": True}},
        "forgetting": None, "adaptation": 2.0, "stability_gap": {"prose": {"gap": 0.0, "peak_step": None,
                                                                          "recovered_step": None}},
        "harness": {},
    },
}
CPT = {
    "name": "cpt", "data": ["code"], "steps": 10, "shares": {"code": 0.75, "prose": 0.25},
    "evals": {0: {"code": 6.0, "prose": 5.0}, 5: {"code": 6.2, "prose": 5.3}, 10: {"code": 4.0, "prose": 5.1}},
    "summary": None,
}


def write_run(root: Path, name: str, stages: list[dict], *, harness: bool = False, ema: bool = False) -> Path:
    """A run directory as `cpt run` leaves it: recipe.yaml, and per stage metrics.jsonl (+ summary.json)."""
    run = root / name
    run.mkdir(parents=True)
    recipe = {"name": name, "stages": [{"name": s["name"], "data": dict.fromkeys(s["data"], {})} for s in stages]}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for stage in stages:
        lines = []
        for step in range(stage["steps"] + 1):
            if step in stage["evals"]:
                lines.append(eval_record(step, stage["evals"], harness=harness, ema=ema))
            if step < stage["steps"]:
                done = (step + 1) * TOKENS_PER_STEP
                record = {"step": step, "tokens": done, "lr": 1e-3 * (1 - step / stage["steps"]),
                          "loss": 5.0 - step / 10, "grad_norm": None if step == 2 else 1.0, "skipped": 0}
                for d, share in stage["shares"].items():
                    record[f"loss/{d}"] = "nan" if step == 3 else 5.0 - step / 10
                    record[f"tokens/{d}"] = int(share * done)
                lines.append(record)
        (run / stage["name"]).mkdir()
        (run / stage["name"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        if stage["summary"] is not None:
            (run / stage["name"] / "summary.json").write_text(json.dumps(stage["summary"]))
    return run


def eval_record(step: int, evals: dict, *, harness: bool, ema: bool) -> dict:
    base, now = evals[0], evals[step]
    record = {"kind": "eval", "step": step, "tokens": step * TOKENS_PER_STEP, "eval/seconds": 0.1}
    for d, loss in now.items():
        record.update({f"eval/{d}/loss": loss, f"eval/{d}/ppl": math.exp(loss), f"delta/{d}": loss - base[d]})
        if ema:
            record.update({f"ema/eval/{d}/loss": loss + 0.05, f"ema/delta/{d}": loss - base[d]})
    if harness and step in (0, max(evals)):
        record["harness/cpt_nextline_code/acc"] = 0.25 if step == 0 else 0.4
    return record


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("|")]
    return [dict(zip(lines[0], row)) for row in lines[2:]]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


# ----------------------------------------------------------------------------- pure functions


def test_stage_offsets_accumulate_earlier_stages():
    assert stage_offsets([640, 320, 128]) == [0, 640, 960]
    assert stage_offsets([500]) == [0]
    assert stage_offsets([]) == []


def test_mixture_shares_from_cumulative_tokens():
    cumulative = np.array([
        [96, np.nan],  # prose not mentioned yet: no prose tokens so far
        [192, 64],     # +96 code, +64 prose
        [192, 64],     # nothing new
        [256, np.nan],  # +64 code, prose carried forward
        [288, 160],    # +32 code, +96 prose
    ])
    shares = mixture_shares(cumulative)
    np.testing.assert_allclose(shares[[0, 1, 3, 4]], [[1.0, 0.0], [0.6, 0.4], [1.0, 0.0], [0.25, 0.75]])
    assert np.isnan(shares[2]).all()


def test_rolling_mean_is_centred_and_skips_nan():
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 2.0, np.nan, 4.0]), 3), [1.5, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 3.0]), 1), [1.0, 3.0])


def test_run_labels_fall_back_to_paths_when_names_clash(tmp_path):
    assert run_labels([tmp_path / "a" / "run", tmp_path / "b"]) == ["run", "b"]
    paths = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    assert run_labels(paths) == [str(p) for p in paths]


# ----------------------------------------------------------------------------- reading runs


def test_stages_are_laid_end_to_end_on_the_token_axis(tmp_path):
    run = load_run(write_run(tmp_path, "r", [PRETRAIN, CPT]))
    pretrain, cpt = run.stages
    assert (pretrain.offset, cpt.offset) == (0, 640)  # pretrain's summary says 640 tokens
    x, y = cpt.series("eval/code/loss", evals=True)
    assert x.tolist() == [640, 960, 1280] and y.tolist() == [6.0, 6.2, 4.0]
    x, y = cpt.series("loss/code")
    assert x[0] == 640 + TOKENS_PER_STEP and math.isnan(y[3])  # "nan" in the file
    assert cpt.final_tokens == 640  # unfinished: from its records
    assert run.domains == ["prose", "code"]


def test_torn_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    run = write_run(tmp_path, "r", [PRETRAIN])
    metrics = run / "pretrain" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 10, "tok')
    assert len(load_run(run).stages[0].train) == 10
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    with pytest.raises(CptError, match="line 4 is not valid JSON"):
        load_run(run)


# ----------------------------------------------------------------------------- report and compare


def test_report_writes_figures_page_and_table(tmp_path, capsys):
    run = write_run(tmp_path, "replay-25", [PRETRAIN, {**CPT, "summary": None}], harness=True, ema=True)
    summary = {
        "stage": "cpt", "steps": 10, "tokens": 640, "targeted": ["code"], "other": ["prose"],
        "domains": {
            "code": {"base_loss": 6.1, "final_loss": 3.9, "final_delta": -2.2, "max_delta": 0.05, "max_delta_step": 10,
                     "targeted": True},
            "prose": {"base_loss": 5.0, "final_loss": 5.12, "final_delta": 0.12, "max_delta": 0.3, "max_delta_step": 5,
                      "targeted": False},
        },
        "forgetting": 0.12, "adaptation": 2.2,
        "stability_gap": {"code": {"gap": 0.05, "peak_step": 10, "recovered_step": 40}},
        "harness": {"cpt_nextline_code": {"acc": {"base": 0.25, "final": 0.4, "change": 0.15}}},
    }
    summary["ema"] = {"domains": {"code": {"final_delta": -2.1}, "prose": {"final_delta": "nan"}},
                      "forgetting": 0.08, "adaptation": 2.1, "stability_gap": {}, "harness": {}}
    (run / "cpt" / "summary.json").write_text(json.dumps(summary))
    (run / "report").mkdir()
    (run / "report" / "notes.txt").write_text("mine")

    assert cmd_report(parse(["report", str(run)])) == 0

    out = run / "report"
    for name in ["loss.png", "delta.png", "lr_mixture.png", "harness.png"]:
        assert_png(out / name)
        assert f'src="{name}"' in (out / "index.html").read_text()
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".*.tmp"))
    page = (out / "index.html").read_text()
    assert "<title>cpt report: replay-25</title>" in page and "<table>" in page and "http" not in page
    rows = {r["stage"]: r for r in markdown_rows((out / "summary.md").read_text())}
    assert list(rows) == ["pretrain", "cpt", "cpt (EMA)"]  # an EMA row only where the summary has an "ema" part
    ema = rows["cpt (EMA)"]
    numbers = (ema["forgetting"], ema["adaptation"], ema["Δ code"], ema["Δ prose"])
    assert numbers == ("+0.080", "+2.100", "-2.100", "nan")
    cpt = rows["cpt"]
    assert (cpt["status"], cpt["steps"], cpt["tokens"]) == ("finished", "10", "640")
    numbers = (cpt["forgetting"], cpt["adaptation"], cpt["Δ code"], cpt["Δ prose"])
    assert numbers == ("+0.120", "+2.200", "-2.200", "+0.120")
    assert cpt["stability gap"] == "code 0.050 (peak at step 10, recovered at step 40)"
    assert cpt["harness change"] == "cpt_nextline_code/acc 0.250→0.400 (+0.150)"
    assert (rows["pretrain"]["forgetting"], rows["pretrain"]["adaptation"]) == ("–", "+2.000")
    assert "wrote " + str(out / "index.html") in capsys.readouterr().out


def test_unfinished_stage_is_computed_from_its_metrics(tmp_path):
    run = write_run(tmp_path, "r", [PRETRAIN, CPT], harness=True, ema=True)
    cmd_report(parse(["report", str(run), "--out", str(tmp_path / "out")]))
    rows = {r["stage"]: r for r in markdown_rows((tmp_path / "out" / "summary.md").read_text())}
    cpt = rows["cpt"]
    assert (cpt["status"], cpt["steps"], cpt["tokens"]) == ("unfinished", "10", "640")
    # code (own domain): 6.0 -> 6.2 -> 4.0; prose (other): 5.0 -> 5.3 -> 5.1
    numbers = (cpt["forgetting"], cpt["adaptation"], cpt["Δ code"], cpt["Δ prose"])
    assert numbers == ("+0.100", "+2.000", "-2.000", "+0.100")
    assert cpt["stability gap"] == "code 0.200 (peak at step 5, recovered at step 10)"
    assert cpt["harness change"] == "cpt_nextline_code/acc 0.250→0.400 (+0.150)"
    assert rows["cpt (EMA)"]["Δ code"] == "-2.000" and rows["cpt (EMA)"]["status"] == "unfinished"


def test_single_stage_run_without_harness(tmp_path):
    run = write_run(tmp_path, "r", [PRETRAIN])
    cmd_report(parse(["report", str(run)]))
    out = run / "report"
    assert not (out / "harness.png").exists()
    assert "harness.png" not in (out / "index.html").read_text()
    for name in ["loss.png", "delta.png", "lr_mixture.png"]:
        assert_png(out / name)


def test_compare_overlays_runs_in_one_page_and_table(tmp_path, monkeypatch):
    runs = [write_run(tmp_path, f"replay-{r}", [PRETRAIN, CPT]) for r in (0, 25)]
    monkeypatch.chdir(tmp_path)
    args = parse(["compare", *map(str, runs)])
    assert args.out == Path("cpt-compare")
    assert cmd_compare(args) == 0
    out = tmp_path / "cpt-compare"
    for name in ["loss.png", "delta.png", "lr_mixture.png"]:
        assert_png(out / name)
        assert f'src="{name}"' in (out / "index.html").read_text()
    assert "<title>cpt compare: replay-0, replay-25</title>" in (out / "index.html").read_text()
    rows = markdown_rows((out / "summary.md").read_text())
    assert [(r["run"], r["stage"]) for r in rows] == [
        ("replay-0", "pretrain"), ("replay-0", "cpt"), ("replay-25", "pretrain"), ("replay-25", "cpt")]


# ----------------------------------------------------------------------------- errors


def test_errors_a_user_can_fix(tmp_path):
    with pytest.raises(CptError, match="no such run directory") as err:
        cmd_report(parse(["report", str(tmp_path / "missing")]))
    assert err.value.where == str(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CptError, match="not a directory"):
        cmd_report(parse(["report", str(tmp_path / "file")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CptError, match="no recipe.yaml"):
        cmd_report(parse(["report", str(tmp_path / "empty")]))
    run = write_run(tmp_path, "r", [PRETRAIN])
    (run / "pretrain" / "metrics.jsonl").unlink()
    with pytest.raises(CptError, match="no metrics yet"):
        cmd_report(parse(["report", str(run)]))
    assert not (run / "report").exists()  # nothing written for a run that cannot be read


def test_output_that_is_a_file_is_refused(tmp_path):
    run = write_run(tmp_path, "r", [PRETRAIN])
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(CptError, match="not a directory") as err:
        cmd_compare(parse(["compare", str(run), "--out", str(tmp_path / "out")]))
    assert err.value.where == str(tmp_path / "out") and (tmp_path / "out").read_text() == "keep me"
