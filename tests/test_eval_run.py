"""Evaluation hooks in real runs: base reference, deltas, summaries, EMA, `cpt eval`, ZeRO-3, forgetting."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from cpt.cli import main
from cpt.train.metrics import eval_records, read_metrics

DOMAINS = ("prose", "code")


def cpt(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=900, **kwargs)


def evals(run, stage):
    return eval_records(read_metrics(run / stage / "metrics.jsonl"))


def cpt_here(capsys, *argv) -> tuple[int, str, str]:
    """Commands that train nothing run in this process: no interpreter start-up per call."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# `tiny_run` (tests/conftest.py): the session's shared run, whose cpt stage also runs its tasks every 6 steps.


def test_every_domain_is_measured_against_the_stage_base(tiny_run):
    _, run = tiny_run
    for stage, steps, harness_steps in (("pretrain", [0, 4, 8, 12], [0, 12]), ("cpt", [0, 4, 6, 8, 12], [0, 6, 12])):
        records = evals(run, stage)
        assert [r["step"] for r in records] == steps
        base = records[0]
        for name in DOMAINS:  # both domains in both stages: prose is measured before the cpt stage trains on code
            assert base[f"delta/{name}"] == 0.0
            for r in records:
                loss = r[f"eval/{name}/loss"]
                assert r[f"eval/{name}/ppl"] == pytest.approx(math.exp(loss))
                assert r[f"delta/{name}"] == pytest.approx(loss - base[f"eval/{name}/loss"], abs=1e-12)
        assert {k.split("/")[1] for k in base if k.startswith("harness/")} == {"cpt_nextline_prose", "cpt_nextline_code"}
        assert [r["step"] for r in records if any(k.startswith("harness/") for k in r)] == harness_steps
        assert all(r["eval/seconds"] > 0 and r["eval/tokens_per_s"] > 0 for r in records)
    # the cpt stage starts from the pre-trained model: its base is pretrain's final evaluation
    last, first = evals(run, "pretrain")[-1], evals(run, "cpt")[0]
    for name in DOMAINS:
        assert first[f"eval/{name}/loss"] == pytest.approx(last[f"eval/{name}/loss"], abs=1e-6)
    # pre-training on prose lowered its held-out loss
    assert evals(run, "pretrain")[-1]["delta/prose"] < -0.3


def test_summary_json_of_each_stage(tiny_run):
    _, run = tiny_run
    summary = json.loads((run / "cpt" / "summary.json").read_text())
    last = evals(run, "cpt")[-1]
    assert summary["targeted"] == ["code"] and summary["other"] == ["prose"]
    assert summary["forgetting"] == pytest.approx(last["delta/prose"])
    assert summary["adaptation"] == pytest.approx(-last["delta/code"])
    assert set(summary["harness"]) == {"cpt_nextline_prose", "cpt_nextline_code"}
    assert summary["eval_tokens_per_s"] > 0 and summary["train_tokens_per_s"] > 0
    pre = json.loads((run / "pretrain" / "summary.json").read_text())
    assert pre["targeted"] == ["prose"] and pre["adaptation"] > 0.3


def test_cpt_eval_matches_the_run_own_numbers(tiny_run, capsys):
    recipe, run = tiny_run
    code, out, err = cpt_here(capsys, "eval", run / "pretrain" / "final", "--recipe", recipe, "--stage", "cpt", "--json")
    assert code == 0, err
    result = json.loads(out)
    base = evals(run, "cpt")[0]
    assert set(result) >= {"domains", "harness"}
    for name in DOMAINS:
        assert result["domains"][name]["loss"] == pytest.approx(base[f"eval/{name}/loss"], abs=1e-5)
        assert result["domains"][name]["ppl"] == pytest.approx(math.exp(result["domains"][name]["loss"]))
    for task, metrics in result["harness"].items():
        for metric, value in metrics.items():
            assert value == pytest.approx(base[f"harness/{task}/{metric}"])
    code, table, _ = cpt_here(capsys, "eval", run / "cpt" / "final", "--recipe", recipe, "--tasks")
    assert code == 0 and "prose" in table and "harness" not in table
    code, _, err = cpt_here(capsys, "eval", run / "nowhere", "--recipe", recipe)
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1


def test_report_and_compare_of_a_real_run(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    assert cpt_here(capsys, "report", run, "--out", tmp_path / "report")[0] == 0
    for name in ("loss.png", "delta.png", "lr_mixture.png", "harness.png", "index.html", "summary.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert cpt_here(capsys, "compare", run, run, "--out", tmp_path / "compare")[0] == 0
    assert (tmp_path / "compare" / "index.html").stat().st_size > 0


def _kill_group(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_ema_is_evaluated_exported_and_resumed_exactly(tiny_recipe, tmp_path, capsys):
    settings = ["--set", "stages.pretrain.steps=4", "--set", "stages.cpt.ema={decay: 0.8, export: true}",
                "--set", "stages.cpt.checkpoint={every: 2, keep: 2}"]
    ref = tmp_path / "ref"
    proc = cpt("run", tiny_recipe, "--output-dir", ref, *settings)
    assert proc.returncode == 0, proc.stderr
    records = evals(ref, "cpt")
    for name in DOMAINS:
        assert records[0][f"ema/eval/{name}/loss"] == records[0][f"eval/{name}/loss"]  # the average starts at the weights
        assert records[0][f"ema/delta/{name}"] == 0.0
        assert records[-1][f"ema/eval/{name}/loss"] != records[-1][f"eval/{name}/loss"]
    assert "ema" in json.loads((ref / "cpt" / "summary.json").read_text())
    # final/ holds the average: evaluating it gives the EMA numbers
    code, out, err = cpt_here(capsys, "eval", ref / "cpt" / "final", "--recipe", tiny_recipe, "--tasks", "--json")
    assert code == 0, err
    result = json.loads(out)
    for name in DOMAINS:
        assert result["domains"][name]["loss"] == pytest.approx(records[-1][f"ema/eval/{name}/loss"], abs=1e-5)

    out = tmp_path / "killed"
    runner = subprocess.Popen([sys.executable, "-m", "cpt.cli", "run", str(tiny_recipe), "--output-dir", str(out),
                               *settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "cpt" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8):
        assert runner.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    _kill_group(runner)
    proc = cpt("run", tiny_recipe, "--output-dir", out, "--resume", *settings)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(out / "cpt" / "final" / "model.safetensors"), load_file(ref / "cpt" / "final" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)  # the average was restored exactly
    resumed = evals(out, "cpt")
    assert [r["step"] for r in resumed] == [r["step"] for r in records]
    for mine, theirs in zip(resumed, records):
        assert {k: v for k, v in mine.items() if "/loss" in k} == {k: v for k, v in theirs.items() if "/loss" in k}


def test_zero3_evaluation_is_sharded_and_reduced(tiny_run, tiny_recipe, tmp_path, capsys):
    """Two ZeRO-3 processes measure the same starting model as one process does."""
    _, single = tiny_run
    out = tmp_path / "z3"
    proc = cpt("run", tiny_recipe, "--output-dir", out, "--set", "distributed={zero_stage: 3, num_processes: 2}",
               "--set", "stages.pretrain.steps=4", "--set", "stages.cpt.steps=4",
               "--set", "stages.cpt.ema={decay: 0.5, export: true}")
    assert proc.returncode == 0, proc.stderr
    mine, theirs = evals(out, "pretrain")[0], evals(single, "pretrain")[0]
    for key, value in theirs.items():
        if "/loss" in key or key.startswith("harness/"):
            assert mine[key] == pytest.approx(value, abs=1e-5), key
    # the sharded average is what the evaluation saw and what final/ holds, small (whole) weights included
    last = evals(out, "cpt")[-1]
    code, printed, err = cpt_here(capsys, "eval", out / "cpt" / "final", "--recipe", tiny_recipe, "--tasks", "--json")
    assert code == 0, err
    result = json.loads(printed)
    for name in DOMAINS:
        assert last[f"ema/eval/{name}/loss"] != last[f"eval/{name}/loss"]
        assert result["domains"][name]["loss"] == pytest.approx(last[f"ema/eval/{name}/loss"], abs=1e-5)


@pytest.mark.slow
def test_no_replay_forgets_more_than_half_replay(tmp_path):
    """Ibrahim et al. 2024 in miniature: without replay, continued training on code raises the
    prose loss more than with 50% of each batch replaying prose."""
    from conftest import TINY_RECIPE

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(out=tmp_path / "run"))
    common = ["--set", "stages.pretrain.steps=40", "--set", "stages.cpt.steps=40",
              "--set", "stages.cpt.schedule={type: constant, lr: 1.0e-2, warmup: 2}",
              "--set", "stages.cpt.evaluation={every: 10, max_tokens_per_domain: 2048, harness: {tasks: []}}",
              "--set", "stages.pretrain.evaluation={every: 0, max_tokens_per_domain: 2048, harness: {tasks: []}}"]
    forgetting = {}
    for replay in (0.0, 0.5):
        out = tmp_path / f"replay-{replay}"
        proc = cpt("run", recipe, "--output-dir", out, *common, "--set", f"stages.cpt.mixture={{replay: {replay}}}")
        assert proc.returncode == 0, proc.stderr
        forgetting[replay] = json.loads((out / "cpt" / "summary.json").read_text())["forgetting"]
    assert forgetting[0.0] > forgetting[0.5] + 0.05, forgetting
