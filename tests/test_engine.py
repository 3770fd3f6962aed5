"""The DeepSpeed trainer: lr per step, skipped non-finite steps, ZeRO 0-3 on two processes."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from scripts import tiny

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.data.blocks import TokenBatch
from cpt.errors import CptError
from cpt.train.checkpoint import save
from cpt.train.engine import build_engine, free_memory
from cpt.train.export import export_hf, gather_state_dict
from cpt.train.head import ChunkedHead, causal_lm_loss
from cpt.train.launch import (
    DistributedContext,
    distributed_context,
    launcher_command,
    needs_launch,
    relaunch_under_deepspeed,
)
from cpt.train.model import build_model, resize_for_tokenizer

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
        result = trainer.train_step(micro, t)
        assert result.lr == lr_fn(t) and not result.skipped
        losses = []
        for ids in micro:
            batch = TokenBatch.plain(ids)
            loss, _ = causal_lm_loss(reference, ChunkedHead.of(reference), batch, batch.n_targets())
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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_the_chunked_loss_has_the_loss_and_gradients_of_transformers(tokenizer, arch: str):
    """The output layer's chunked loss against transformers' own (full fp32 logits), tied weights included."""
    model = fresh_model(tokenizer, arch)
    reference = copy.deepcopy(model)
    ids = tiny.blocks(tokenizer, 3)
    batch = TokenBatch.plain(ids)
    torch.manual_seed(1)  # GPT-2's dropout draws the same masks in both
    loss, per_token = causal_lm_loss(model, ChunkedHead.of(model), batch, batch.n_targets())
    loss.backward()
    torch.manual_seed(1)
    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)
    assert per_token[:, -1].eq(0).all() and per_token.sum().item() / batch.n_targets() == pytest.approx(loss.item())
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4), name


def test_bf16_takes_the_adamw_steps_of_fp32_with_or_without_zero(tokenizer):
    """Without ZeRO, bf16 runs through another DeepSpeed wrapper than with ZeRO; both must take the
    same AdamW steps, which stay within bf16 rounding of the fp32 ones."""
    batch = [tiny.blocks(tokenizer, 4)]
    losses = {}
    for stage, precision in [(0, "fp32"), (0, "bf16"), (1, "bf16")]:
        trainer = build_engine(fresh_model(tokenizer), DistributedConfig(zero_stage=stage, precision=precision), OptimizerConfig(),
                               lr_fn, micro_batch_size=4, grad_accum=1)
        losses[stage, precision] = [trainer.train_step(batch, t).loss for t in range(3)]
    assert losses[0, "bf16"] == pytest.approx(losses[1, "bf16"], abs=1e-4)
    assert losses[0, "bf16"] == pytest.approx(losses[0, "fp32"], abs=3e-3)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_closed_engine_leaves_nothing_of_its_stage_alive(tokenizer, stage):
    """Once a stage's engine is closed, its model and optimizer (and so their weights, gradients and
    moments) are collected: DeepSpeed's ZeRO-3 keeps module-level references that close() drops."""
    trainer = build_engine(fresh_model(tokenizer), DistributedConfig(zero_stage=stage), OptimizerConfig(), lr_fn, 2, 1)
    trainer.train_step([tiny.blocks(tokenizer, 2)], 0).loss
    model, optimizer = weakref.ref(trainer.module), weakref.ref(trainer.engine.optimizer)
    trainer.close()
    del trainer
    free_memory()
    assert model() is None and optimizer() is None


def _optimizer_state(trainer) -> list[torch.Tensor]:
    opt = trainer._optimizer
    return [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def _same(a: dict | list, b: dict | list) -> bool:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp32")])
def test_nonfinite_loss_skips_the_update_on_every_path(tokenizer, stage, precision):
    """A NaN in the activations (NaN gradients) and an infinite loss with finite gradients are both
    skipped: weights and Adam moments stay, the count grows; past the limit the run stops."""
    trainer = build_engine(
        fresh_model(tokenizer),
        DistributedConfig(zero_stage=stage, precision=precision),
        OptimizerConfig(max_nonfinite=2),
        lr_fn,
        micro_batch_size=2,
        grad_accum=1,
    )
    batch = [tiny.blocks(tokenizer, 2)]

    def nan_activations(module, args, output):
        return output * float("nan")

    def infinite_loss(module, args, output):
        return output + float("inf")  # the gradient of the loss itself stays finite

    nan = (trainer.module.model.norm, nan_activations)
    inf = (trainer.module.lm_head, infinite_loss)  # the chunked head returns the loss in training
    for step, fault in enumerate([None, nan, inf, None, nan]):
        weights, moments = gather_state_dict(trainer), _optimizer_state(trainer)
        handle = fault[0].register_forward_hook(fault[1]) if fault else None
        try:
            if step == 4:  # the third non-finite step: one more than max_nonfinite
                with pytest.raises(CptError, match="non-finite on 3 steps"):
                    trainer.train_step(batch, step)
            else:
                result = trainer.train_step(batch, step)
                assert result.lr == lr_fn(step) and result.skipped == (fault is not None)
                assert math.isfinite(result.loss) == (fault is None) == (result.grad_norm is not None)
        finally:
            if handle:
                handle.remove()
        unchanged = _same(gather_state_dict(trainer), weights) and _same(_optimizer_state(trainer), moments)
        assert unchanged == (fault is not None)
    assert trainer.nonfinite == 3 and trainer.updates == 2


def test_nonfinite_weights_are_never_saved_or_exported(tokenizer, tmp_path):
    trainer = build_engine(fresh_model(tokenizer), DistributedConfig(), OptimizerConfig(), lr_fn, 2, 1)
    trainer.train_step([tiny.blocks(tokenizer, 2)], 0)
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
    tok.pad_token = None  # a tokenizer without padding pads with its end-of-sequence token
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


def _assert_sound(name: str, r: dict) -> None:
    """Two processes, one model: the loss falls, and a fresh engine loaded from the step-4
    checkpoint continues exactly like the engine that wrote it."""
    assert r["world_size"] == 2 and r["ranks_agree"], name
    losses = r["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, (name, losses)
    assert all(g is not None and math.isfinite(g) for g in r["grad_norms"]), name
    assert r["client_state"] == {"step": 4, "tokens": [1, 2]}
    assert r["resumed"] == pytest.approx(r["continued"], abs=1e-6), name
    assert r["max_weight_diff"] <= 1e-6, name


def _driver_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


@pytest.mark.slow
def test_zero_stages_on_two_processes(tokenizer, tmp_path, monkeypatch):
    """ZeRO 0-3 (and ZeRO-2 bf16 with the optimizer offloaded) under the deepspeed launcher, started
    the way `cpt run` starts it; checkpoints export alone to the weights the live engines export."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.train.export import export_checkpoint

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    monkeypatch.setenv("PYTHONPATH", _driver_env()["PYTHONPATH"])  # relaunching passes this environment on
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    code = relaunch_under_deepspeed([str(tmp_path), str(tok_dir)], DistributedConfig(num_processes=2), module="ds_driver")
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == ["z0-fp32", "z1-fp32", "z2-bf16-offload", "z2-fp32", "z3-fp32"]
    for name, r in results.items():
        _assert_sound(name, r)
        if "fp32" in name:  # the same AdamW steps whatever the partitioning: only the order of reductions differs
            reference = results["z0-fp32"]["losses"] + results["z0-fp32"]["continued"]
            assert r["losses"] + r["continued"] == pytest.approx(reference, abs=1e-5), name
            assert r["grad_norms"] == pytest.approx(results["z0-fp32"]["grad_norms"], rel=1e-5), name

        live = load_file(tmp_path / name / "live-step-4" / "model.safetensors")
        export_checkpoint(tmp_path / name / "ckpt" / "step-4", tmp_path / name / "exported")
        exported = load_file(tmp_path / name / "exported" / "model.safetensors")
        assert live.keys() == exported.keys() and all(torch.equal(live[k], exported[k]) for k in live), name

    final = tmp_path / "z3-fp32" / "exported"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = AutoTokenizer.from_pretrained(final)("def f(x): return x", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_other_launchers_run_zero3_on_two_processes(tokenizer, tmp_path, launcher):
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    start = {
        "torchrun": ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", port],
        "accelerate": ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port],
    }[launcher]
    cmd = [sys.executable, "-m", *start, "-m", "ds_driver", str(tmp_path), str(tok_dir), "z3-fp32"]
    proc = subprocess.run(cmd, env={**_driver_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tiny.failure(proc.stderr)
    _assert_sound("z3-fp32", json.loads((tmp_path / "results.json").read_text())["z3-fp32"])


@pytest.mark.slow
def test_relaunch_starts_n_processes_and_passes_sigterm_to_them(tmp_path):
    """SIGTERM to `cpt run` reaches each training process once, and they may finish in peace."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from cpt.train.launch import relaunch_under_deepspeed as r; "
         "from cpt.config.training import DistributedConfig as D; "
         f"sys.exit(r([{str(tmp_path)!r}], D(num_processes=2), module='signal_driver'))"],
        env=_driver_env(),
    )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready-0", "ready-1", "stopped-0", "stopped-1"]
    assert [(tmp_path / f"ready-{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert [(tmp_path / f"stopped-{r}").read_text() for r in (0, 1)] == ["1", "1"]


def test_group_losses_split_the_step_loss_by_sequence_label(tokenizer):
    """Per-domain losses are each sequence's own loss, and the same update as the unlabelled path."""
    data = tiny.blocks(tokenizer, 4)
    labelled = build_engine(fresh_model(tokenizer), DistributedConfig(), OptimizerConfig(), lr_fn, 2, 2)
    plain = build_engine(fresh_model(tokenizer), DistributedConfig(), OptimizerConfig(), lr_fn, 2, 2)
    with torch.no_grad():
        alone = [labelled.module(input_ids=data[i : i + 1], labels=data[i : i + 1]).loss.item() for i in range(4)]
    groups = [torch.tensor([0, 2]), torch.tensor([2, 2])]
    result = labelled.train_step([data[:2], data[2:]], 0, groups=groups, n_groups=3)
    reference = plain.train_step([data[:2], data[2:]], 0)
    assert result.group_losses[0] == pytest.approx(alone[0], rel=1e-5)
    assert result.group_losses[1] is None  # no sequence of group 1 in this batch
    assert result.group_losses[2] == pytest.approx(sum(alone[1:]) / 3, rel=1e-5)
    assert result.loss == pytest.approx(reference.loss, rel=1e-5)
    for a, b in zip(labelled.module.parameters(), plain.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_reduction_per_step_carries_loss_groups_skip_and_stop(tokenizer, monkeypatch):
    """Loss, per-domain sums, the skip decision and the stop flag travel in one collective, on the
    engine's device (NCCL takes nothing else)."""
    from cpt import dist

    trainer = build_engine(fresh_model(tokenizer), DistributedConfig(), OptimizerConfig(), lr_fn, 2, 2)
    data = tiny.blocks(tokenizer, 4)
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, op="sum": calls.append(t.device) or real(t, op))
    groups = [torch.tensor([0, 1]), torch.tensor([1, 1])]
    result = trainer.train_step([data[:2], data[2:]], 0, groups=groups, n_groups=2, stop=True)
    assert calls == [trainer.device]
    assert result.stop and not result.skipped
    assert result.loss > 0 and all(v is not None for v in result.group_losses)
    assert not trainer.train_step([data[:2], data[2:]], 1).stop
