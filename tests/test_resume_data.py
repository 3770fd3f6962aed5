"""A checkpoint pins the data it indexes: --resume on changed data is refused (issue 11, item 3)."""

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RECIPE = """
name: pinned
seed: 0
output_dir: {out}
stages:
  - name: s
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    tokenizer:
      train: {{vocab_size: 300, max_documents: 40}}
    data:
      notes: {{source: "{data}", heldout: 2}}
    schedule: {{type: constant, lr: 1.0e-3}}
    steps: 6
    seq_len: 16
    batch: {{global_batch_size: 2, micro_batch_size: 2}}
    checkpoint: {{every: 2}}
    evaluation: {{enabled: false}}
"""


def cpt(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def documents(n: int, word: str) -> str:
    return "".join(json.dumps({"text": f"{word} note {i}: " + " ".join(f"{word}{j}" for j in range(i % 7 + 12))}) + "\n"
                   for i in range(n))


def test_resume_on_changed_data_is_refused_and_on_the_same_data_continues(tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text(documents(60, "alpha"))
    recipe = tmp_path / "pinned.yaml"
    out = tmp_path / "run"
    recipe.write_text(RECIPE.format(out=out, data=data))
    killed = cpt("run", recipe, env={"CPT_FAULT": "checkpoint.renamed@1:kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = out / "s" / "checkpoints" / "step-2"
    assert (ckpt / "cpt_checkpoint.json").is_file()

    original, stat = data.read_text(), data.stat()
    data.write_text(documents(60, "beta"))  # other documents under the same path and recipe
    refused = cpt("run", recipe, "--resume")
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(f"error: {ckpt}: data.notes: the data changed"), err
    assert not (out / "s" / "final").exists()

    data.write_text(original)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the file as it was
    done = cpt("run", recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "s" / "final" / "config.json").is_file()
