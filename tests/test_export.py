"""Exports: Hugging Face directories that load offline, from a live engine or a checkpoint alone."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from scripts import tiny
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.checkpoint import save
from cpt.train.engine import build_engine
from cpt.train.export import export_checkpoint, export_hf
from cpt.train.model import build_model, resize_for_tokenizer

TEXT = "The with statement is used to wrap the execution of a block."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok"))


def trained(tokenizer, arch: str, precision: str = "fp32", zero_stage: int = 0):
    torch.manual_seed(0)
    model = build_model(tiny.model_spec(arch))
    resize_for_tokenizer(model, tokenizer)
    dist = DistributedConfig(zero_stage=zero_stage, precision=precision)
    trainer = build_engine(model, dist, OptimizerConfig(), lambda t: 1e-2, micro_batch_size=2, grad_accum=1)
    for t in range(2):
        trainer.train_step([tiny.blocks(tokenizer, 2)], t)
    return trainer


def same_tensors(a_dir, b_dir) -> bool:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_export_loads_offline_with_the_trained_logits(tokenizer, tmp_path, arch):
    trainer = trained(tokenizer, arch)
    trainer.module.generation_config.update(do_sample=True, temperature=0.7)  # a base model's own sampling defaults
    export_hf(trainer, tokenizer, tmp_path / "final")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "final").iterdir()}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = loaded_tok(TEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer(TEXT, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trainer.module.eval()(ids).logits)
    assert loaded_tok.eos_token_id == loaded.config.eos_token_id

    save(trainer, tmp_path / "ckpt", 2, {}, tokenizer=tokenizer)
    shutil.move(tmp_path / "ckpt" / "step-2", tmp_path / "kept-aside")  # a checkpoint stands alone
    export_checkpoint(tmp_path / "kept-aside", tmp_path / "from-ckpt")
    assert same_tensors(tmp_path / "final", tmp_path / "from-ckpt")
    for out in ("final", "from-ckpt"):
        assert GenerationConfig.from_pretrained(tmp_path / out).temperature == 0.7


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_exports_bf16_from_engine_and_checkpoint_alike(tokenizer, tmp_path, zero_stage):
    trainer = trained(tokenizer, "llama", precision="bf16", zero_stage=zero_stage)
    export_hf(trainer, tokenizer, tmp_path / "final")
    save(trainer, tmp_path / "ckpt", 2, {}, tokenizer=tokenizer)
    export_checkpoint(tmp_path / "ckpt" / "step-2", tmp_path / "from-ckpt")
    assert same_tensors(tmp_path / "final", tmp_path / "from-ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from-ckpt", dtype="auto")
    assert model.dtype == torch.bfloat16


def test_export_replaces_an_earlier_one_whole(tokenizer, tmp_path):
    trainer = trained(tokenizer, "llama")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("from an earlier run")
    export_hf(trainer, tokenizer, tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert not (tmp_path / "final" / "stale.txt").exists()
