"""`cpt run` end to end on a tiny two-stage recipe: layout, chaining, exact resume, stop requests."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.cli import main
from cpt.train.metrics import read_metrics, train_records

pytestmark = pytest.mark.slow


def cpt(*argv, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "cpt.cli", *map(str, argv)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, **kwargs,
    )


def weights(run_dir: Path, stage: str) -> dict:
    return load_file(run_dir / stage / "final" / "model.safetensors")


def losses(run_dir: Path, stage: str) -> list[float]:
    return [r["loss"] for r in train_records(read_metrics(run_dir / stage / "metrics.jsonl"))]


def test_run_layout_metrics_and_chaining(tiny_run, capsys):
    recipe, run = tiny_run
    assert (run / "recipe.yaml").is_file()
    for stage in ("pretrain", "cpt"):
        records = train_records(read_metrics(run / stage / "metrics.jsonl"))
        assert [r["step"] for r in records] == list(range(12))
        for r in records:
            assert {"step", "tokens", "lr", "loss"} <= set(r)
        assert records[-1]["tokens"] == 12 * 8 * 32
        final = run / stage / "final"
        model = AutoModelForCausalLM.from_pretrained(final)
        tokenizer = AutoTokenizer.from_pretrained(final)
        assert model.config.vocab_size >= len(tokenizer)
        assert sorted(p.name for p in (run / stage / "checkpoints").iterdir()) == ["step-12", "step-8"]  # keep: 2
    pre = train_records(read_metrics(run / "pretrain" / "metrics.jsonl"))
    assert pre[-1]["loss"] < pre[0]["loss"] - 0.5
    cpt_records = train_records(read_metrics(run / "cpt" / "metrics.jsonl"))
    # replay 0.25: the realized prose tokens stay within one block (32 tokens) of the plan at every step
    for r in cpt_records:
        assert abs(r["tokens/prose"] - 0.25 * r["tokens"]) <= 32
        assert r["tokens/prose"] + r["tokens/code"] == r["tokens"]
        # the per-domain training losses bracket the batch loss they average into
        if "loss/prose" in r:
            assert min(r["loss/prose"], r["loss/code"]) - 1e-9 <= r["loss"] <= max(r["loss/prose"], r["loss/code"]) + 1e-9
    # a model from scratch is sized for its tokenizer: it starts near ln(vocab)
    assert pre[0]["loss"] == pytest.approx(math.log(len(AutoTokenizer.from_pretrained(run / "pretrain" / "final"))), abs=0.3)
    # the cpt stage starts from the pre-trained weights, not from scratch
    assert cpt_records[0]["loss"] < pre[0]["loss"] - 0.3
    # lr per step is the schedule's
    capsys.readouterr()
    assert main(["plan", str(recipe), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [r["lr"] for r in cpt_records] == pytest.approx(plan["stages"][1]["lr"], rel=1e-12)


def test_existing_run_directory_is_not_clobbered(tiny_run, tmp_path, capsys):
    recipe, shared = tiny_run
    run = copy_run(shared, tmp_path / "run")  # the shared run stays read-only
    before = (run / "cpt" / "metrics.jsonl").read_bytes()
    assert main(["run", str(recipe), "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --resume" in err and len(err.strip().splitlines()) == 1
    assert (run / "cpt" / "metrics.jsonl").read_bytes() == before
    # resuming a finished run is a no-op that succeeds
    assert main(["run", str(recipe), "--output-dir", str(run), "--resume"]) == 0
    assert (run / "cpt" / "metrics.jsonl").read_bytes() == before


def test_resume_with_a_different_recipe_is_refused(tiny_run, tmp_path, capsys):
    recipe, shared = tiny_run
    run = copy_run(shared, tmp_path / "run")
    assert main(["run", str(recipe), "--output-dir", str(run), "--resume", "--set", "stages.cpt.steps=13"]) == 2
    assert "differs from the one this run was started with" in capsys.readouterr().err


def _start_until(recipe: Path, out: Path, stage: str, lines: int) -> subprocess.Popen:
    """Start `cpt run` in the background and return once ``stage`` has logged ``lines`` steps."""
    log = open(out.with_suffix(".log"), "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "cpt.cli", "run", str(recipe), "--output-dir", str(out)],
                            stderr=log, text=True)
    metrics = out / stage / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            raise AssertionError(f"the run ended or stalled before it could be interrupted: {log.read()[-2000:]}")
        time.sleep(0.05)
    return proc


def test_kill_9_then_resume_is_bitwise_identical(tiny_run, tmp_path):
    recipe, ref = tiny_run
    out = tmp_path / "killed"
    # kill in the middle of the second stage, after at least one checkpoint of it
    proc = _start_until(recipe, out, "cpt", 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "cpt" / "final").exists()
    done = cpt("run", recipe, "--output-dir", out, "--resume")
    assert done.returncode == 0, done.stderr
    for stage in ("pretrain", "cpt"):
        assert losses(out, stage) == losses(ref, stage)
        mine, theirs = weights(out, stage), weights(ref, stage)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_sigterm_checkpoints_and_exits_cleanly(tiny_run, tmp_path):
    recipe, ref = tiny_run
    out = tmp_path / "stopped"
    proc = _start_until(recipe, out, "pretrain", 2)
    metrics = out / "pretrain" / "metrics.jsonl"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = out.with_suffix(".log").read_text()
    assert proc.returncode == 0, err
    assert "--resume" in err
    steps = [int(p.name.split("-")[1]) for p in (out / "pretrain" / "checkpoints").glob("step-*")]
    stopped_at = len(train_records(read_metrics(metrics)))
    assert stopped_at < 12 and max(steps) == stopped_at  # saved right after the step it finished
    done = cpt("run", recipe, "--output-dir", out, "--resume")
    assert done.returncode == 0, done.stderr
    assert losses(out, "cpt") == losses(ref, "cpt")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_train_and_export(tmp_path, tiny_recipe, arch):
    configs = {
        "gpt2": "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4, n_positions: 64}",
        "qwen2": "{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                 "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}",
    }
    out = tmp_path / arch
    proc = cpt("run", tiny_recipe, "--output-dir", out, "--set", f"stages.pretrain.model={{config: {configs[arch]}}}",
               "--set", "stages.pretrain.steps=4", "--set", "stages.cpt.steps=4")
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(out / "cpt" / "final")
    assert model.config.model_type == arch
