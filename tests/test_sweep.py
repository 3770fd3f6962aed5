"""`cpt sweep`: one run per ratio on a shared base, a table per (ratio, budget), resumable; then `cpt fit`."""

import csv
import json
import subprocess
import sys

import pytest

from cpt.cli import main
from cpt.train.metrics import read_metrics, train_records


def cpt(*argv):
    """Training commands run in their own process, as a user runs them."""
    return subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=900)


def cpt_here(capsys, *argv) -> tuple[int, str, str]:
    """Commands that train nothing run in this process: no interpreter start-up per call."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_sweep_table_shared_base_resume_and_fit(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", tiny_recipe, "--stage", "cpt", "--ratios", "0,0.5,1", "--tokens", "512,1024",
            "--output-dir", out, "--set", "stages.pretrain.steps=4"]
    proc = cpt(*args)
    assert proc.returncode == 0, proc.stderr
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["ratio"]), int(r["tokens"])) for r in rows] == [
        (r, t) for r in (0.0, 0.5, 1.0) for t in (512, 1024)
    ]
    assert {"ratio", "tokens", "general_loss", "domain_loss", "params", "loss/prose", "loss/code",
            "base_general_loss", "base_domain_loss", "base_loss/prose", "base_loss/code"} <= set(rows[0])
    assert len({r["base_general_loss"] for r in rows}) == 1  # every ratio starts from the same base model
    # ... the base run's own final model, read with the tokenizer it was trained with
    base = json.loads((out / "base" / "pretrain" / "summary.json").read_text())
    assert float(rows[0]["base_general_loss"]) == pytest.approx(base["domains"]["prose"]["final_loss"], abs=1e-6)
    assert all(r["general_loss"] == r["loss/prose"] and r["domain_loss"] == r["loss/code"] for r in rows)
    assert int(rows[0]["params"]) > 10_000
    # the stages before the swept one are trained once and shared
    assert (out / "ratio-0.5" / "pretrain").is_symlink() and (out / "base" / "pretrain" / "final").is_dir()
    # the mixture of each run is its ratio: ratio 0 trains on prose only, ratio 1 on code only
    for ratio, share in (("0", 0.0), ("0.5", 0.5), ("1", 1.0)):
        last = train_records(read_metrics(out / f"ratio-{ratio}" / "cpt" / "metrics.jsonl"))[-1]
        assert last["tokens/code"] == pytest.approx(share * last["tokens"], abs=32)
    # a constant lr after the warmup, as in the CMR paper
    lrs = [r["lr"] for r in train_records(read_metrics(out / "ratio-1" / "cpt" / "metrics.jsonl"))]
    assert len(set(lrs[2:])) == 1
    # finished ratios are skipped: the table is rebuilt without training
    before = (out / "ratio-1" / "cpt" / "metrics.jsonl").read_bytes()
    again = cpt(*args)
    assert again.returncode == 0 and (out / "ratio-1" / "cpt" / "metrics.jsonl").read_bytes() == before
    # the sweep directory is a table for cpt fit; the baseline comes from the table
    code, printed, err = cpt_here(capsys, "fit", out, "--law", "cmr", "--json", "--bootstrap", "0")
    assert code == 0, err
    result = json.loads(printed)
    assert result["cmr"]["baseline_general_loss"] == pytest.approx(float(rows[0]["base_general_loss"]))


def test_sweep_of_a_first_stage_is_refused(tiny_recipe, capsys):
    code, _, err = cpt_here(capsys, "sweep", tiny_recipe, "--stage", "pretrain", "--ratios", "0.5")
    assert code == 2 and "needs an earlier stage" in err and len(err.splitlines()) == 1
    code, _, err = cpt_here(capsys, "sweep", tiny_recipe, "--stage", "nope", "--ratios", "0.5")
    assert code == 2 and "no stage named 'nope'" in err
    code, _, err = cpt_here(capsys, "sweep", tiny_recipe, "--stage", "cpt", "--ratios", "0.5,2")
    assert code == 2 and "[0, 1]" in err
