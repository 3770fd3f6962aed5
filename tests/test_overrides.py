"""`stages[].model.overrides`: RoPE base, RoPE scaling and context length set before the weights load,
used by the model, kept in the export; bad overrides are one `error:` line each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cpt.cli import main
from cpt.config.overrides import ModelOverrides
from cpt.train.model import build_model, model_config, with_overrides
from scripts import tiny

HEAD_DIM = tiny.ARCHS["llama"]["hidden_size"] // tiny.ARCHS["llama"]["num_attention_heads"]
OVERRIDES = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "max_position_embeddings": 128}


def inv_freq(theta: float, factor: float = 1.0) -> torch.Tensor:
    """RoPE's per-pair frequencies for the tiny llama's heads; linear scaling divides them by the factor."""
    return 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)) / factor


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny llama with its tokenizer, saved as a Hugging Face directory (RoPE base 10,000)."""
    out = tmp_path_factory.mktemp("base")
    tiny.train_tokenizer(out)
    build_model(tiny.model_spec("llama")).save_pretrained(out)
    return out


def test_overrides_reach_the_rotary_embedding_and_keep_the_weights(base_dir):
    config = with_overrides(model_config(str(base_dir)), ModelOverrides.model_validate(OVERRIDES), "here")
    model = build_model(str(base_dir), config=config)
    base = build_model(str(base_dir))
    assert torch.allclose(base.model.rotary_emb.inv_freq, inv_freq(10000.0))
    assert torch.allclose(model.model.rotary_emb.inv_freq, inv_freq(500000.0, 2.0))
    assert model.config.max_position_embeddings == 128
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_a_new_base_keeps_the_models_scaling_and_a_new_scaling_keeps_its_base():
    llama3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    scaled = with_overrides(model_config(tiny.model_spec("llama")),
                            ModelOverrides.model_validate({"rope_scaling": llama3, "max_position_embeddings": 512}), "")
    assert scaled.rope_parameters == {"rope_theta": 10000.0, "rope_type": "llama3",
                                      **{k: v for k, v in llama3.items() if k != "type"}}
    rebased = with_overrides(scaled, ModelOverrides(rope_theta=500000.0), "")
    assert rebased.rope_parameters == {**scaled.rope_parameters, "rope_theta": 500000.0}


RUN = """
name: long
seed: 0
output_dir: {out}
distributed: {{zero_stage: 0, num_processes: 1, precision: fp32}}
stages:
  - name: ctx-32
    model: {model}
    tokenizer: {base}
    data:
      prose: {{source: "builtin:python-docs", heldout: 2, max_documents: 12}}
    schedule: {{type: constant, lr: 1.0e-3}}
    steps: 2
    seq_len: 32
    batch: {{global_batch_size: 4, micro_batch_size: 4}}
    evaluation: {{enabled: false}}
  - name: ctx-64
    model:
      overrides: {{max_position_embeddings: 256}}
    data:
      code: {{source: "builtin:python-stdlib", heldout: 2, max_documents: 6}}
    schedule: {{type: constant, lr: 1.0e-3}}
    steps: 1
    seq_len: 64
    batch: {{global_batch_size: 2, micro_batch_size: 2}}
    evaluation: {{enabled: false}}
"""


def write_recipe(tmp_path: Path, base_dir: Path, model: dict) -> Path:
    """RUN with ``model`` as its first stage's model: a short stage, then a longer one continuing from it."""
    recipe = tmp_path / "long.yaml"
    recipe.write_text(RUN.format(out=tmp_path / "run", base=base_dir, model=json.dumps(model)))
    return recipe


def test_a_run_exports_the_overrides_and_a_continuing_stage_adds_its_own(base_dir, tmp_path):
    recipe = write_recipe(tmp_path, base_dir, {"path": str(base_dir), "overrides": OVERRIDES})
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = tmp_path / "run" / "ctx-32" / "final", tmp_path / "run" / "ctx-64" / "final"
    written = json.loads((first / "config.json").read_text())
    assert written["max_position_embeddings"] == 128
    assert written["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    for final, positions in ((first, 128), (second, 256)):  # the second stage keeps the first one's RoPE
        config = AutoConfig.from_pretrained(final)
        assert config.max_position_embeddings == positions
        assert config.rope_parameters["rope_theta"] == 500000.0
        model = AutoModelForCausalLM.from_pretrained(final)
        assert torch.allclose(model.model.rotary_emb.inv_freq, inv_freq(500000.0, 2.0))


def test_overrides_the_model_cannot_take_stop_the_run_with_one_error_line(base_dir, tmp_path):
    """GPT-2 has learned positions, no RoPE: found when the stage builds its model, before any step."""
    recipe = write_recipe(tmp_path, base_dir, {"config": tiny.ARCHS["gpt2"], "overrides": {"rope_theta": 1e6}})
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {recipe}: stages.ctx-32.model.overrides: gpt2 has no rotary position embedding (RoPE) settings "
        "to override"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, where, message", [
    ({"rope_base": 1e6}, "overrides", "cannot override rope_base; allowed: rope_theta, rope_scaling, "
                                      "max_position_embeddings"),
    ({"rope_theta": -1.0}, "overrides.rope_theta", "greater than 0"),
    ({"rope_scaling": {"rope_type": "ntk", "factor": 2.0}}, "overrides.rope_scaling.type", "'linear', 'dynamic'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 64}},
     "overrides.rope_scaling", "a llama3 rope_scaling needs high_freq_factor"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "beta_fast": 32.0}}, "overrides.rope_scaling",
     "a linear rope_scaling takes no beta_fast (it takes factor)"),
    ({"max_position_embeddings": 0}, "overrides.max_position_embeddings", "greater than 0"),
])
def test_a_bad_override_is_one_error_line(base_dir, tmp_path, capsys, overrides, where, message):
    recipe = write_recipe(tmp_path, base_dir, {"path": str(base_dir), "overrides": overrides})
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}: stages.ctx-32.model.{where}: "), lines
    assert message in lines[0]


def test_only_overrides_cannot_start_the_first_stage(base_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, base_dir, {"overrides": {"rope_theta": 1e6}})
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}: stages.ctx-32.model: the first stage needs a model (an HF dir, a hub id or {{config: ...}})"
    )
