"""The DeepSpeed trainer: lr per step, skipped non-finite steps, ZeRO 0-3 on two processes."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from cpt.errors import CptError
from cpt.train.checkpoint import save
from cpt.train.engine import DistributedConfig, OptimizerConfig, build_engine
from cpt.train.export import export_hf, gather_state_dict
from cpt.train.launch import DistributedContext, distributed_context, launcher_command, needs_launch, relaunch_under_deepspeed
from cpt.train.model import build_model, resize_for_tokenizer
from scripts import tiny

SCRIPTS = Path(__file__).parent / "scripts"
LRS = [3e-3, 1e-2, 5e-3, 2e-3, 7e-3, 4e-3]


def lr_fn(t: int) -> float:
    return LRS[t]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok"))


def fresh_model(tokenizer, arch="llama", seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny.model_spec(arch))
    resize_for_tokenizer(model, tokenizer)
    return model


def test_lr_of_step_t_is_lr_fn_t_and_updates_match_plain_adamw(tokenizer):
    """Four DeepSpeed steps (2 micro-batches each) give bitwise the weights of a hand-written AdamW loop."""
    model = fresh_model(tokenizer)
    reference = copy.deepcopy(model)
    opt = OptimizerConfig(weight_decay=0.1, grad_clip=0.0)
    trainer = build_engine(model, DistributedConfig(), opt, lr_fn, micro_batch_size=2, grad_accum=2)
    data = tiny.blocks(tokenizer, 16)

    decay = [p for p in reference.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference.parameters() if p.ndim < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=opt.betas, eps=opt.eps
    )
    for t in range(4):
        micro = [data[4 * t : 4 * t + 2], data[4 * t + 2 : 4 * t + 4]]
        result = trainer.train_step(micro)
        assert result.lr == lr_fn(t) and not result.skipped
        losses = []
        for ids in micro:
            loss = reference(input_ids=ids, labels=ids).loss
            (loss / 2).backward()
            losses.append(loss.item())
        for group in adamw.param_groups:
            group["lr"] = lr_fn(t)
        adamw.step()
        adamw.zero_grad()
        assert result.loss == pytest.approx(sum(losses) / 2, abs=1e-6)
        assert result.grad_norm is not None and result.grad_norm > 0
    trained = dict(trainer.module.named_parameters())
    assert all(torch.equal(trained[n], p) for n, p in reference.named_parameters())
    assert trainer.updates == 4


def _optimizer_state(trainer) -> list[torch.Tensor]:
    opt = trainer._optimizer
    return [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def _same(a: dict | list, b: dict | list) -> bool:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp32")])
def test_nonfinite_loss_skips_the_update_on_every_path(tokenizer, stage, precision):
    """A NaN in the activations (NaN gradients) and an infinite loss with finite gradients are both
    skipped: weights, Adam moments and the lr position stay; the count grows; past the limit it stops."""
    trainer = build_engine(
        fresh_model(tokenizer),
        DistributedConfig(zero_stage=stage, precision=precision),
        OptimizerConfig(max_nonfinite=1),
        lr_fn,
        micro_batch_size=2,
        grad_accum=1,
    )
    batch = [tiny.blocks(tokenizer, 2)]
    assert not trainer.train_step(batch).skipped

    def nan_activations(module, args, output):
        return output * float("nan")

    def infinite_loss(module, args, output):
        output.loss = output.loss + float("inf")  # the gradient of the loss itself stays finite
        return output

    for n, (target, hook) in enumerate([(trainer.module.model.norm, nan_activations), (trainer.module, infinite_loss)], 1):
        weights, moments = gather_state_dict(trainer), _optimizer_state(trainer)
        handle = target.register_forward_hook(hook)
        try:
            if n > trainer.max_nonfinite:
                with pytest.raises(CptError, match="non-finite"):
                    trainer.train_step(batch)
            else:
                result = trainer.train_step(batch)
                assert result.skipped and not math.isfinite(result.loss) and result.grad_norm is None
                assert result.lr == lr_fn(1)
        finally:
            handle.remove()
        assert trainer.nonfinite == n and trainer.updates == 1
        assert _same(gather_state_dict(trainer), weights) and _same(_optimizer_state(trainer), moments)

    result = trainer.train_step(batch)  # training goes on where it was
    assert not result.skipped and result.lr == lr_fn(1) and trainer.updates == 2


def test_nonfinite_weights_are_never_saved_or_exported(tokenizer, tmp_path):
    trainer = build_engine(fresh_model(tokenizer), DistributedConfig(), OptimizerConfig(), lr_fn, 2, 1)
    trainer.train_step([tiny.blocks(tokenizer, 2)])
    save(trainer, tmp_path / "ckpt", 1, {"step": 1}, tokenizer=tokenizer)
    with torch.no_grad():
        trainer.module.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(CptError, match="non-finite"):
        save(trainer, tmp_path / "ckpt", 2, {"step": 2}, tokenizer=tokenizer)
    with pytest.raises(CptError, match="non-finite"):
        export_hf(trainer, tokenizer, tmp_path / "final")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-1"]
    assert not (tmp_path / "final").exists()


def test_build_model_reports_what_cannot_be_loaded(tmp_path):
    with pytest.raises(CptError) as err:
        build_model(str(tmp_path / "missing"))
    assert err.value.where == "model" and "no such directory" in err.value.message
    with pytest.raises(CptError):
        build_model({"config": {"model_type": "not-a-model"}})
    with pytest.raises(CptError):
        build_model({"config": {"hidden_size": 32}})


def test_resize_for_tokenizer_grows_vocab_and_aligns_special_ids(tokenizer):
    torch.manual_seed(0)
    model = build_model({"config": {**tiny.ARCHS["gpt2"], "vocab_size": 100}})
    tok = copy.deepcopy(tokenizer)
    resize_for_tokenizer(model, tok)
    assert model.get_input_embeddings().num_embeddings == len(tok) == model.config.vocab_size
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id


def test_distributed_settings_are_checked():
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage"):
        DistributedConfig(offload_optimizer=True)
    with pytest.raises(ValueError):
        DistributedConfig(zero_stage=4)
    with pytest.raises(ValueError):
        OptimizerConfig(betas=(0.9, 1.0))


def test_launch_decision_reads_the_launcher_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed_context() == DistributedContext(rank=0, world_size=1, local_rank=0, launched=False)
    assert needs_launch(DistributedConfig(num_processes=2)) and not needs_launch(DistributedConfig())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_context() == DistributedContext(rank=1, world_size=2, local_rank=1, launched=True)
    assert not needs_launch(DistributedConfig(num_processes=2))
    cmd = launcher_command(["run", "r.yaml"], DistributedConfig(num_processes=3, master_port=29999, hostfile="hosts"))
    assert cmd[-6:] == ["29999", "--no_local_rank", "--module", "cpt.cli", "run", "r.yaml"]
    assert cmd[cmd.index("--num_gpus") + 1] == "3" and cmd[cmd.index("--hostfile") + 1] == "hosts"


@pytest.mark.slow
def test_zero_stages_on_two_processes(tokenizer, tmp_path, monkeypatch):
    """ZeRO 0-3 (and ZeRO-2 bf16 with the optimizer offloaded) under the deepspeed launcher:
    the loss falls, a fresh engine loaded from a checkpoint continues like the original one,
    and checkpoints export alone to the weights the live engines export."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.train.export import export_checkpoint

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    code = relaunch_under_deepspeed([str(tmp_path), str(tok_dir)], DistributedConfig(num_processes=2), module="ds_driver")
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == ["z0-fp32", "z1-fp32", "z2-bf16-offload", "z2-fp32", "z3-fp32"]
    for name, r in results.items():
        assert r["world_size"] == 2 and r["ranks_agree"], name
        losses = r["losses"]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, (name, losses)
        assert all(g is not None and math.isfinite(g) for g in r["grad_norms"]), name
        assert r["client_state"] == {"step": 4, "tokens": [1, 2]}
        tol = 1e-6 if "fp32" in name else 1e-2
        assert max(abs(a - b) for a, b in zip(r["continued"], r["resumed"])) <= tol, (name, r["continued"], r["resumed"])
        assert r["max_weight_diff"] <= tol, name

        live = load_file(tmp_path / name / "live-step-4" / "model.safetensors")
        export_checkpoint(tmp_path / name / "ckpt" / "step-4", tmp_path / name / "exported")
        exported = load_file(tmp_path / name / "exported" / "model.safetensors")
        assert live.keys() == exported.keys() and all(torch.equal(live[k], exported[k]) for k in live), name

    final = tmp_path / "z3-fp32" / "exported"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = AutoTokenizer.from_pretrained(final)("def f(x): return x", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
