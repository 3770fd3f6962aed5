"""Kill -9 at every phase of a save, random kills, a full disk: each resumed run ends exactly as an
uninterrupted one, and a release is never lost (issue 11, items 2, 7 and 10)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpt.train.metrics import read_metrics, reproducible, train_records

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = pytest.mark.slow

RECIPE = """
name: faults
seed: 3
output_dir: {out}
distributed: {{zero_stage: {zero}, num_processes: {procs}}}
stages:
  - name: s
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    tokenizer:
      train: {{vocab_size: 384, max_documents: 40}}
    data:
      prose: {{source: "builtin:python-docs", heldout: 4, max_documents: 30}}
      code: {{source: "builtin:python-stdlib", heldout: 4, max_documents: 30}}
    schedule: {{type: wsd-s, lr: 5.0e-3, warmup: 1, period: 4, decay: 2}}
    steps: 8
    seq_len: 32
    batch: {{global_batch_size: 4, micro_batch_size: 2}}
    checkpoint: {{every: 2, keep: 3}}
    evaluation: {{every: 4, max_tokens_per_domain: 256, harness: {{tasks: []}}}}
"""
CHAOS_K = int(os.environ.get("CPT_CHAOS_K", "5"))


def write_recipe(tmp: Path, zero: int = 0, procs: int = 1) -> Path:
    path = tmp / f"faults-z{zero}-p{procs}.yaml"
    path.write_text(RECIPE.format(out=tmp / "unused", zero=zero, procs=procs))
    return path


def cpt(*argv, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def outcome(run: Path) -> tuple[list, dict, dict]:
    """What must be identical: the training records, the final weights and the release's weights."""
    records = [reproducible(r) for r in train_records(read_metrics(run / "s" / "metrics.jsonl"))]
    final = load_file(run / "s" / "final" / "model.safetensors")
    release = load_file(run / "s" / "releases" / "step-4" / "model.safetensors")
    return records, final, release


def assert_same(mine, theirs, tol: float = 0.0):
    (records, final, release), (records_ref, final_ref, release_ref) = mine, theirs
    assert [r["step"] for r in records] == [r["step"] for r in records_ref]
    for a, b in zip(records, records_ref):
        assert a.keys() == b.keys()
        for k in a:
            if tol and isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=tol, abs=tol), k
            else:
                assert a[k] == b[k], k
    for got, want in ((final, final_ref), (release, release_ref)):
        assert got.keys() == want.keys()
        for k in got:
            if tol:
                torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol)
            else:
                assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    recipe = write_recipe(tmp)
    started = time.perf_counter()
    cpt("run", recipe, "--output-dir", tmp / "ref")
    return recipe, outcome(tmp / "ref"), time.perf_counter() - started


# Each phase of a save, in the order a save passes them; a process counts its passes from 1.
# The first run dies in the second save (step 4, the release step); each resume starts again
# from step 2 and dies in its first save, until the step-4 checkpoint is complete; the last
# kill is in the save after it.
PHASES = ["checkpoint.engine@2", "checkpoint.rng@1", "checkpoint.marker@1", "checkpoint.rename@1",
          "checkpoint.renamed@1", "checkpoint.engine@1"]


def test_kill_at_each_phase_of_a_save_then_resume_exactly(reference, tmp_path):
    recipe, expected, _ = reference
    out = tmp_path / "run"
    for i, fault in enumerate(PHASES):
        argv = ["run", recipe, "--output-dir", out] + (["--resume"] if i else [])
        killed = cpt(*argv, env={"CPT_FAULT": f"{fault}:kill"}, check=False)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr[-2000:])
        assert not (out / "s" / "final").exists()
        done = sorted(int(p.name.split("-")[1]) for p in (out / "s" / "checkpoints").glob("step-*"))
        assert done == ([2, 4] if fault in ("checkpoint.renamed@1", "checkpoint.engine@1") else [2]), (fault, done)
        if fault == "checkpoint.renamed@1":
            # the release of step 4 was exported before the checkpoint that marks step 4 done
            assert (out / "s" / "releases" / "step-4" / "model.safetensors").is_file()
    cpt("run", recipe, "--output-dir", out, "--resume")
    assert_same(outcome(out), expected)


def _kill_at(recipe: Path, out: Path, delay: float, resume: bool) -> None:
    argv = [sys.executable, "-m", "cpt.cli", "run", str(recipe), "--output-dir", str(out)] + (["--resume"] if resume else [])
    log = open(out.parent / "chaos.log", "a")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(argv, stderr=log, stdout=log, start_new_session=True)
    deadline = time.time() + delay
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every training process, at once
    proc.wait()


def chaos(recipe: Path, out: Path, seed: int, kills: int, span: float) -> list[float]:
    """Kill the run ``kills`` times at random moments of a run's ``span`` seconds, resuming after each."""
    rng = random.Random(seed)
    delays = [rng.uniform(0.2 * span, span) for _ in range(kills)]
    for i, delay in enumerate(delays):
        _kill_at(recipe, out, delay, resume=i > 0)
    cpt("run", recipe, "--output-dir", out, "--resume")
    return delays


def test_chaos_random_kills_resume_bitwise(reference, tmp_path):
    """CPT_CHAOS_K kills (5 by default) at random moments, each followed by --resume."""
    recipe, expected, span = reference
    seed = int(os.environ.get("CPT_CHAOS_SEED", "0"))
    delays = chaos(recipe, tmp_path / "run", seed, CHAOS_K, span)
    assert_same(outcome(tmp_path / "run"), expected)
    print(f"chaos: {CHAOS_K} kills at {', '.join(f'{d:.1f}' for d in delays)} s (seed {seed}), resumed bitwise equal")


# A full disk at each kind of write, one after another, each resumed: a checkpoint's engine files,
# its marker, its rename, a metrics record, any other atomic file.
DISK_FULL = ["checkpoint.engine@2", "checkpoint.marker@1", "checkpoint.rename@1", "metrics.write@2", "io.write@3"]


def test_enospc_is_one_line_and_resume_finishes_exactly(reference, tmp_path):
    recipe, expected, _ = reference
    out = tmp_path / "run"
    for i, fault in enumerate(DISK_FULL):
        argv = ["run", recipe, "--output-dir", out] + (["--resume"] if i else [])
        full = cpt(*argv, env={"CPT_FAULT": f"{fault}:enospc"}, check=False)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 2 and "Traceback" not in full.stderr, (fault, full.stderr[-3000:])
        assert lines[-1].startswith(f"error: {out}") and "No space left on device" in lines[-1], (fault, lines[-1])
        assert not list((out / "s" / "checkpoints").glob(".tmp-*"))  # the space is given back
        assert not (out / "s" / "final").exists()
    cpt("run", recipe, "--output-dir", out, "--resume")
    assert_same(outcome(out), expected)


def _can_mount() -> bool:
    probe = Path(f"/tmp/cpt-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not _can_mount(), reason="needs to mount a tmpfs (root)")
def test_a_really_full_disk(reference, tmp_path):
    """The run directory on a small tmpfs: the disk fills during a checkpoint, space is freed, --resume."""
    recipe, expected, _ = reference
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "run"
        full = cpt("run", recipe, "--output-dir", out, check=False)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert lines[-1].startswith("error: ") and "No space left on device" in lines[-1], lines[-1]
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        cpt("run", recipe, "--output-dir", out, "--resume")
        assert_same(outcome(out), expected)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_process_killed_while_loading_deepspeed_ops_does_not_stall_the_next(tmp_path):
    """PyTorch loads a just-in-time built op under a lock file that a process killed meanwhile leaves
    behind, and would make every later run wait for it forever: the next cpt process removes it."""
    from cpt.train.engine import import_deepspeed
    from cpt.train.ops import CPU_ADAM, SHARED_MEMORY_COMM, op_directories, op_lock

    import_deepspeed()
    directories = op_directories(SHARED_MEMORY_COMM, CPU_ADAM)
    stale = [d / "lock" for d in directories]
    assert len(stale) == 2
    with op_lock(directories):  # no cpt process loads an op meanwhile: these are what a killed one leaves
        for lock in stale:
            lock.touch()
    try:
        proc = subprocess.run([sys.executable, str(SCRIPTS / "load_ops.py")], capture_output=True, text=True, timeout=600)
    finally:
        for lock in stale:
            lock.unlink(missing_ok=True)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
    assert all(f"removing {lock}" in proc.stderr for lock in stale)
