"""Decay branches (`cpt anneal`) and WSD-S releases (a two-process ZeRO-3 run killed and resumed: test_faults)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_run
from transformers import AutoModelForCausalLM

from cpt.cli import main
from cpt.train.metrics import read_metrics, train_records

pytestmark = pytest.mark.slow


def cpt(*argv):
    return subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=900)


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wsd_run(tiny_run, tmp_path_factory):
    """A private copy of the session's tiny run, which the anneal tests write their branches into.

    Its cpt stage is WSD with its lr stable from step 2 through step 9 (then a short decay): up to the
    step-8 checkpoint the branches fork from, it trains exactly as a WSD run without any decay.
    """
    return copy_run(tiny_run[1], tmp_path_factory.mktemp("wsd") / "run")


def cpt_here(capsys, *argv) -> tuple[int, str, str]:
    """Commands that train nothing run in this process: no interpreter start-up per call."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_anneal_branch_continues_a_checkpoint_and_leaves_the_main_branch_alone(wsd_run, capsys):
    main_stage = wsd_run / "cpt"
    before = tree_bytes(main_stage)
    proc = cpt("anneal", main_stage, "--from", "step-8", "--steps", "4",
               "--set", "mixture={weights: {code: 0.5, prose: 0.5}}")
    assert proc.returncode == 0, proc.stderr
    assert tree_bytes(main_stage / "checkpoints") == {
        k.relative_to("checkpoints"): v for k, v in before.items() if k.parts[0] == "checkpoints"
    }
    assert (main_stage / "metrics.jsonl").read_bytes() == before[Path("metrics.jsonl")]
    branch = main_stage / "anneal-step-8"
    records = train_records(read_metrics(branch / "metrics.jsonl"))
    lrs = [r["lr"] for r in records]
    main_records = train_records(read_metrics(main_stage / "metrics.jsonl"))
    assert lrs[0] == pytest.approx(main_records[8]["lr"])  # decays from where the main branch was
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.5 * lrs[0]
    assert records[-1]["tokens/code"] == records[-1]["tokens/prose"]  # the branch's own mixture: upsampled prose
    # it continues the checkpoint: its first loss is the main branch's loss level, not a fresh model's
    assert abs(records[0]["loss"] - main_records[8]["loss"]) < 0.5
    AutoModelForCausalLM.from_pretrained(branch / "final")
    code, _, err = cpt_here(capsys, "anneal", main_stage, "--from", "step-8", "--steps", "4")
    assert code == 2 and "already exists" in err


def test_a_branch_of_an_earlier_stage_is_evaluated_on_every_domain_of_the_recipe(wsd_run):
    proc = cpt("anneal", wsd_run / "pretrain", "--from", "step-8", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((wsd_run / "pretrain" / "anneal-step-8" / "summary.json").read_text())
    assert set(summary["domains"]) == {"prose", "code"}  # code comes in a later stage: forgetting needs its base too


def test_anneal_of_a_missing_checkpoint_is_a_clear_error(wsd_run, capsys):
    code, _, err = cpt_here(capsys, "anneal", wsd_run / "cpt", "--from", "step-5", "--steps", "4")
    assert code == 2 and "not a complete cpt checkpoint" in err  # an error line, not an exception
    assert "Traceback" not in err


def test_export_of_an_intermediate_checkpoint(wsd_run, tmp_path, capsys):
    code, _, err = cpt_here(capsys, "export", wsd_run / "cpt" / "checkpoints" / "step-8", tmp_path / "hf")
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.model_type == "llama"
    code, _, err = cpt_here(capsys, "export", wsd_run / "cpt" / "checkpoints" / "step-8", tmp_path / "hf")
    assert code == 2 and "already exists" in err


def test_wsd_s_exports_a_release_at_every_period_end(tiny_recipe):
    proc = cpt("run", tiny_recipe, "--set", "stages.pretrain.steps=4",
               "--set", "stages.cpt.schedule={type: wsd-s, lr: 2.0e-3, warmup: 1, period: 4, decay: 0.5}")
    assert proc.returncode == 0, proc.stderr
    run = tiny_recipe.parent / "run"
    assert sorted(p.name for p in (run / "cpt" / "releases").iterdir()) == ["step-4", "step-8"]
    lrs = [r["lr"] for r in train_records(read_metrics(run / "cpt" / "metrics.jsonl"))]
    assert lrs[4] == pytest.approx(2.0e-3) and lrs[3] < lrs[4]  # restart at peak, no re-warmup
