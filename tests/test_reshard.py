"""Resuming on another number of processes: 2 -> 1 and 1 -> 2 under ZeRO 0, 2 and 3, on CPU.

Three launches of tests/scripts/reshard_driver.py: one process trains uninterrupted (and
checkpoints midway); two processes do the same and resume the one-process checkpoint; one process
resumes the two-process checkpoint. Each resumed run must see the same global batches as the
uninterrupted run it continues, and track its losses and EMA within 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts import tiny

from cpt.train.checkpoint import read_meta
from cpt.config.training import DistributedConfig
from cpt.train.launch import launcher_command
from cpt.train.reshard import UNIVERSAL, convert

SCRIPTS = Path(__file__).parent / "scripts"
STAGES = (0, 2, 3)
SAVE_AT = 3  # reshard_driver.SAVE_AT


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def _launch(processes: int, *args: str) -> None:
    """``reshard_driver ARGS`` as one plain process, or under the deepspeed launcher as `cpt run` starts it."""
    if processes == 1:
        cmd = [sys.executable, "-m", "reshard_driver", *args]
    else:
        cmd = launcher_command(args, DistributedConfig(num_processes=processes), module="reshard_driver")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _leave_partial_conversion(ckpt: Path) -> None:
    """A universal directory without the file ds_to_universal writes last (copied in part, say)."""
    tmp = ckpt / UNIVERSAL / f"global_step{SAVE_AT}"
    tmp.mkdir(parents=True)
    (tmp / "partial.pt").write_bytes(b"\0")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reshard")
    tiny.train_tokenizer(out / "tok")
    stages = ",".join(map(str, STAGES))
    _launch(1, str(out), str(out / "tok"), stages, "run")
    _launch(2, str(out), str(out / "tok"), stages, "run", "resume:1")
    _leave_partial_conversion(out / "z2" / "w2" / "ckpt" / f"step-{SAVE_AT}")
    _launch(1, str(out), str(out / "tok"), stages, "resume:2")
    return out


def _read(out: Path, stage: int, run: str) -> tuple[dict, dict[int, list[int]]]:
    """A run's result and its global batch (every rank's rows, in rank order) per step."""
    here = out / f"z{stage}" / run
    result = json.loads((here / "result.json").read_text())
    ranks = [json.loads(p.read_text()) for p in sorted(here.glob("rows-*.json"))]
    return result, {int(step): [row for r in ranks for row in r[step]] for step in ranks[0]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_resumed_run_continues_the_uninterrupted_one(out, stage, saved, resumed):
    reference, reference_rows = _read(out, stage, f"w{saved}")
    result, rows = _read(out, stage, f"w{saved}-to-w{resumed}")
    assert sorted(rows) == list(range(SAVE_AT, len(reference_rows)))
    assert rows == {step: reference_rows[step] for step in rows}  # the data order goes on exactly
    assert result["losses"] == pytest.approx({k: reference["losses"][k] for k in result["losses"]}, rel=1e-5)
    assert result["ema"] == pytest.approx(reference["ema"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("saved", [1, 2])
def test_zero_checkpoints_are_converted_once_beside_the_original(out, stage, saved):
    """ZeRO 1-3 get universal/ (a partial one replaced, a complete one reused), ZeRO-0 needs none."""
    ckpt = out / f"z{stage}" / f"w{saved}" / "ckpt" / f"step-{SAVE_AT}"
    universal = ckpt / UNIVERSAL / f"global_step{SAVE_AT}"
    assert universal.is_dir() == (stage > 0)
    if stage > 0:
        assert (universal / "zero" / "optimizer_state.pt").is_file() and not (universal / "partial.pt").exists()
        assert sorted(p.name for p in (ckpt / UNIVERSAL).iterdir()) == ["convert.log", f"global_step{SAVE_AT}", "latest_universal"]
        made = (ckpt / UNIVERSAL).stat().st_ino
        assert convert(ckpt, read_meta(ckpt), 0, torch.device("cpu")) == ckpt / UNIVERSAL
        assert (ckpt / UNIVERSAL).stat().st_ino == made
