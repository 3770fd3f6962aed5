"""One live process per job directory; a lock left by a killed process is taken over (issue 11, item 6)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cpt.cli import main
from cpt.errors import CptError
from cpt.lock import HOLDER, hold

HOLD_SCRIPT = "import sys, time; from cpt.lock import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path):
    proc = _holder(tmp_path / "job")
    try:
        with pytest.raises(CptError) as err:
            with hold(tmp_path / "job"):
                pass
        assert f"pid {proc.pid} on {socket.gethostname()}" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "job" / HOLDER).exists()  # what the killed holder left behind
    with hold(tmp_path / "job"):
        assert f'"pid": {os.getpid()}' in (tmp_path / "job" / HOLDER).read_text()


@pytest.mark.parametrize("resume", [False, True])
def test_run_anneal_and_sweep_refuse_a_directory_in_use(tmp_path, tiny_recipe, capsys, resume):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        flags = ["--resume"] if resume else []
        before = sorted(p.name for p in run_dir.iterdir())
        assert main(["run", str(tiny_recipe), "--output-dir", str(run_dir), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {run_dir}: in use by pid {proc.pid} on "), err
        assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sweep_takes_the_lock(tmp_path, tiny_recipe, capsys):
    sweep_dir = tmp_path / "sweep"
    proc = _holder(sweep_dir)
    try:
        code = main(["sweep", str(tiny_recipe), "--stage", "cpt", "--ratios", "0.5",
                     "--output-dir", str(sweep_dir)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"in use by pid {proc.pid}" in err[0], err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
