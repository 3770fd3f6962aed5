"""Test-wide settings (offline hubs, CPU DeepSpeed, a private data cache per session) and the session's shared runs."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# the tiny models gain nothing from intra-op threads, and two workers x two ranks would oversubscribe 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
# a child process that crashes or aborts prints each thread's Python stack into the stderr the tests show
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


def _session_dir(tmp_path_factory) -> Path:
    """This session's temporary root, shared by its pytest-xdist workers (their basetemps are siblings in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep tokenizer and block caches of tests away from the user's ~/.cache/cpt. The workers of a
    session share one, as the processes of a run share a cache on a shared disk (entries are
    staged and renamed into place, so workers that build the same entry at once cannot clash)."""
    cache = _session_dir(tmp_path_factory) / "cpt-cache"
    cache.mkdir(exist_ok=True)
    os.environ["CPT_CACHE_DIR"] = str(cache)
    yield


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_ops():
    """Build DeepSpeed's just-in-time ops before any test runs: built by the first test that needs them,
    they can take minutes on a busy 2-core machine, past the time limits that tests set on runs."""
    script = Path(__file__).parent / "scripts" / "load_ops.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


TINY_RECIPE = """
name: tiny
seed: 0
output_dir: {out}
stages:
  - name: pretrain
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    tokenizer:
      train: {{vocab_size: 512, max_documents: 60}}
    data:
      prose: {{source: "builtin:python-docs", heldout: 4, max_documents: 40}}
    schedule: {{type: cosine, lr: 1.0e-2, warmup: 2}}
    steps: 12
    seq_len: 32
    batch: {{global_batch_size: 8, micro_batch_size: 4}}
    checkpoint: {{every: 4, keep: 2}}
    evaluation: {{every: 4, max_tokens_per_domain: 512, harness: {{limit: 12}}}}
  - name: cpt
    data:
      code: {{source: "builtin:python-stdlib", heldout: 4, max_documents: 40}}
    mixture: {{replay: 0.25}}
    schedule: {{type: wsd, lr: 2.0e-3, warmup: 2, decay: 0.25}}
    steps: 12
    seq_len: 32
    batch: {{global_batch_size: 8, micro_batch_size: 4}}
    checkpoint: {{every: 4, keep: 2}}
    evaluation: {{every: 4, max_tokens_per_domain: 512, harness: {{limit: 12}}}}
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """A two-stage recipe (prose pre-training, then code with replay) that trains in seconds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(out=tmp_path / "run"))
    return path


def tiny_run_recipe(out) -> str:
    """The recipe of the shared run: TINY_RECIPE whose cpt stage also runs its harness tasks every 6 steps."""
    head, tail = TINY_RECIPE.format(out=out).rsplit("harness: {limit: 12}", 1)
    return head + "harness: {limit: 12, every: 6}" + tail


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, _private_cache):
    """One uninterrupted `cpt run` of :func:`tiny_run_recipe`, trained once for the whole session.

    Yields ``(recipe_path, run_dir)``. Trained once for all pytest-xdist workers too: the first
    worker to need it trains it under a file lock, the others wait and reuse it. Read-only by
    contract, and checked at the end of each worker's session: several modules compare against
    it or read its artifacts. A test that writes into a run (``--resume``, ``cpt anneal``, a
    refused run that takes the directory's lock) works on ``copy_run(run_dir, tmp_path / ...)``.
    """
    shared = _session_dir(tmp_path_factory)
    tmp = shared / "tiny-run"
    with FileLock(shared / "tiny-run.lock"):
        if not (tmp / "trained").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            recipe = tmp / "tiny.yaml"
            recipe.write_text(tiny_run_recipe(tmp / "run"))
            proc = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe)], capture_output=True,
                                  text=True, timeout=900, check=False)
            assert proc.returncode == 0, proc.stderr
            (tmp / "trained").touch()
    before = _tree_digest(tmp)
    yield tmp / "tiny.yaml", tmp / "run"
    assert _tree_digest(tmp) == before, "a test wrote into the shared tiny_run; copy it with copy_run first"


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A private copy of a run directory (of the shared ``tiny_run``) that a test may write into."""
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest

