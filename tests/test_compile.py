"""stages[].compile: compiled transformer blocks train under ZeRO 0 and 2, and a killed compiled run
resumes bitwise equal to the uninterrupted one (inductor on the CPU, which needs a C++ compiler)."""

import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cpt.train.metrics import read_metrics, reproducible, train_records
from test_faults import cpt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                       reason="torch.compile's inductor needs a C++ compiler (gcc) on the CPU"),
]

RECIPE = """
name: compiled
seed: 5
distributed: {{zero_stage: {zero}, num_processes: 1}}
stages:
  - name: s
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    tokenizer:
      train: {{vocab_size: 384, max_documents: 40}}
    data:
      prose: {{source: "builtin:python-docs", heldout: 4, max_documents: 30}}
    schedule: {{type: cosine, lr: 5.0e-3, warmup: 1}}
    steps: 4
    seq_len: 32
    batch: {{global_batch_size: 4, micro_batch_size: 2}}
    checkpoint: {{every: 2, keep: 2}}
    document_masking: true
    compile: {compile}
    evaluation: {{enabled: false}}
"""


def run(tmp: Path, name: str, zero: int = 0, compile: bool = True, env=None, resume=False, check=True):
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(RECIPE.format(zero=zero, compile=str(compile).lower()))
    return cpt("run", recipe, "--output-dir", tmp / name, *(["--resume"] if resume else []), env=env, check=check)


def outcome(run_dir: Path):
    records = [reproducible(r) for r in train_records(read_metrics(run_dir / "s" / "metrics.jsonl"))]
    return records, load_file(run_dir / "s" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compiled")
    run(tmp, "ref")
    return tmp, outcome(tmp / "ref")


def test_a_killed_compiled_run_resumes_bitwise(compiled):
    tmp, (records, weights) = compiled
    killed = run(tmp, "killed", env={"CPT_FAULT": "checkpoint.renamed@1:kill"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run(tmp, "killed", resume=True)
    again, again_weights = outcome(tmp / "killed")
    assert again == records
    assert again_weights.keys() == weights.keys()
    assert all(again_weights[k].equal(weights[k]) for k in weights)


def test_compiled_zero2_trains_as_compiled_zero0(compiled):
    tmp, (records, _) = compiled
    run(tmp, "zero2", zero=2)
    zero2, _ = outcome(tmp / "zero2")
    assert [r["step"] for r in zero2] == [r["step"] for r in records]
    for mine, ref in zip(zero2, records):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_every_block_and_nothing_else_is_compiled():
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt.train.model import compile_blocks

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type="llama", hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=3, num_attention_heads=4,
                                                                  vocab_size=64))
    compile_blocks(model, "stages.s.compile")
    compiled = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == ["model.layers.0", "model.layers.1", "model.layers.2"]
