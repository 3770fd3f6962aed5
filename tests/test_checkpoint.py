"""Checkpoints: exact resume, atomic saves that survive kill -9, keep-last-K."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scripts import tiny

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.errors import CptError
from cpt.train.checkpoint import MARKER, checkpoints, latest, load, read_meta, save
from cpt.train.engine import build_engine
from cpt.train.model import build_model, resize_for_tokenizer

SCRIPTS = Path(__file__).parent / "scripts"


def lr_fn(t: int) -> float:
    return 1e-3 * (t + 1)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny.train_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def make_trainer(tokenizer, seed=0, arch="llama", zero_stage=0, grad_accum=1, precision="fp32"):
    torch.manual_seed(seed)
    model = build_model(tiny.model_spec(arch))
    resize_for_tokenizer(model, tokenizer)
    dist = DistributedConfig(zero_stage=zero_stage, precision=precision)
    return build_engine(model, dist, OptimizerConfig(), lr_fn, 2, grad_accum)


@pytest.mark.parametrize("arch,precision", [("gpt2", "fp32"), ("llama", "bf16")])
def test_resume_is_bitwise_exact(tokenizer, tmp_path, arch, precision):
    """6 steps straight == 3 steps, save, a fresh engine with other weights, load, 3 steps.
    GPT-2 has dropout, so the restored generator state matters as much as the weights; bf16
    without ZeRO keeps fp32 master weights in DeepSpeed's optimizer wrapper, which must come back."""
    data = tiny.blocks(tokenizer, 24)
    batches = [[data[4 * t : 4 * t + 2], data[4 * t + 2 : 4 * t + 4]] for t in range(6)]

    straight = make_trainer(tokenizer, arch=arch, grad_accum=2, precision=precision)
    torch.manual_seed(1234)
    expected = [straight.train_step(b, t).loss for t, b in enumerate(batches)]

    first = make_trainer(tokenizer, arch=arch, grad_accum=2, precision=precision)
    torch.manual_seed(1234)
    losses = [first.train_step(b, t).loss for t, b in enumerate(batches[:3])]
    save(first, tmp_path, 3, {"step": 3, "cursor": [7, 9]}, tokenizer=tokenizer)
    torch.rand(100)  # the generator moves on, as it would in a killed process's successor

    resumed = make_trainer(tokenizer, seed=99, arch=arch, grad_accum=2, precision=precision)
    assert load(resumed, latest(tmp_path)) == {"step": 3, "cursor": [7, 9]}
    assert resumed.updates == 3
    losses += [resumed.train_step(b, t).loss for t, b in enumerate(batches[3:], 3)]

    assert losses == expected
    final = dict(straight.module.named_parameters())
    assert all(torch.equal(final[n], p) for n, p in resumed.module.named_parameters())


def test_a_killed_save_never_becomes_latest(tok_dir, tokenizer, tmp_path):
    """kill -9 in the middle of a save: the last complete checkpoint stays latest and loads."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "save_loop", str(tmp_path), str(tok_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    started: dict[int, float] = {}
    durations = []
    try:
        for line in proc.stdout:  # DeepSpeed logs to stdout too
            if not line.startswith("save-loop "):
                continue
            _, what, step, when = line.split()
            step, when = int(step), float(when)
            if what == "saving" and step == 4:
                time.sleep(0.5 * sum(durations) / len(durations))  # aim at the middle of the save
                break
            if what == "saving":
                started[step] = when
            else:
                durations.append(when - started[step])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(durations) == 3

    best = latest(tmp_path)
    assert best is not None and best.name in ("step-3", "step-4")
    assert [p.name for p in checkpoints(tmp_path)] in (["step-2", "step-3"], ["step-3", "step-4"])
    trainer = make_trainer(tokenizer, zero_stage=1)
    assert load(trainer, best) == {"step": read_meta(best)["step"]}


def test_partial_saves_are_ignored_then_cleaned_and_keep_prunes(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer)
    batch = [tiny.blocks(tokenizer, 2)]
    for step in (1, 2):
        trainer.train_step(batch, step - 1)
        save(trainer, tmp_path, step, {"step": step}, tokenizer=tokenizer)
    # What crashes (or careless copies) leave behind: a save in progress, a directory without
    # its marker, a marker cut short.
    shutil.copytree(tmp_path / "step-2", tmp_path / ".tmp-step-3", ignore=shutil.ignore_patterns(MARKER))
    shutil.copytree(tmp_path / "step-2", tmp_path / "step-5", ignore=shutil.ignore_patterns(MARKER))
    shutil.copytree(tmp_path / "step-2", tmp_path / "step-6")
    (tmp_path / "step-6" / MARKER).write_text('{"format": 1, "st')
    assert latest(tmp_path) == tmp_path / "step-2"
    with pytest.raises(CptError, match="not a complete cpt checkpoint"):
        load(trainer, tmp_path / "step-5")

    for step in (3, 4):
        trainer.train_step(batch, step - 1)
        save(trainer, tmp_path, step, {"step": step}, tokenizer=tokenizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    assert latest(tmp_path) == tmp_path / "step-4"
    meta = json.loads((tmp_path / "step-4" / MARKER).read_text())
    assert meta["trainer"] == {"updates": 4, "nonfinite": 0} and meta["world_size"] == 1

    save(trainer, tmp_path, 4, {"step": 4, "again": True}, tokenizer=tokenizer, keep=2)  # the same step, saved anew
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    assert load(make_trainer(tokenizer), tmp_path / "step-4") == {"step": 4, "again": True}


def test_load_refuses_a_checkpoint_of_other_settings(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer)
    trainer.train_step([tiny.blocks(tokenizer, 2)], 0)
    save(trainer, tmp_path, 1, {}, tokenizer=tokenizer)
    with pytest.raises(CptError, match="zero_stage 0 \\(this run: 1\\)"):
        load(make_trainer(tokenizer, zero_stage=1), tmp_path / "step-1")
    assert latest(tmp_path / "nothing-here") is None
