"""The engine at scale (issue 12): activation checkpointing, throughput accounting, prefetching,
ZeRO-3 partitioned loading, experiment trackers and a simulated two-node run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import tiny

from cpt.data.blocks import TokenBatch
from cpt.data.sampler import MixtureSampler
from cpt.train.metrics import read_metrics, train_records
from cpt.train.model import build_model, enable_activation_checkpointing
from cpt.train.prefetch import Prefetcher
from cpt.train.throughput import device_peak_flops, flops_per_token, model_flops_per_token
from cpt.train.trackers import mlflow_key

SCRIPTS = Path(__file__).parent / "scripts"
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _blocks(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_activation_checkpointing_recomputes_each_block_and_changes_nothing(arch):
    spec = tiny.model_spec(arch)
    if arch == "gpt2":  # without dropout, so that the recomputation draws nothing
        spec["config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(spec)
        if checkpointed:
            enable_activation_checkpointing(model, "memory")
        calls = []
        for block in _blocks(model):  # transformers checkpoints a block's forward, inside its hooks: watch a part
            next(block.children()).register_forward_hook(lambda *_: calls.append(1))
        loss = model(input_ids=ids, labels=ids).loss
        forward_calls = len(calls)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.item(), grads, forward_calls, len(calls) - forward_calls))
    (loss0, grads0, fwd0, re0), (loss1, grads1, fwd1, re1) = results
    assert fwd0 == fwd1 == len(_blocks(model)) == 2
    assert (re0, re1) == (0, 2)  # the backward pass ran every block's forward again
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, atol=1e-6, rtol=0)


def test_model_flops_follow_palm():
    """6N over the non-embedding weights plus 12 L d T for attention; a tied embedding is a matmul."""
    spec = tiny.model_spec("llama")["config"]
    model = build_model({"config": spec})
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    assert model_flops_per_token(model, 32) == 6 * (n - emb) + 12 * 2 * 32 * 32
    tied = build_model(tiny.model_spec("qwen2"))
    n_tied = sum(p.numel() for p in tied.parameters())  # the shared weight is listed once
    assert model_flops_per_token(tied, 16) == flops_per_token(tied.config, n_tied, 0, 16) == 6 * n_tied + 12 * 2 * 32 * 16


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12), ("NVIDIA H100 PCIe", "bf16", 756.5e12),
    ("NVIDIA H100 NVL", "fp32", 60e12), ("NVIDIA H200", "bf16", 989.4e12), ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA L40S", "bf16", 362.05e12), ("NVIDIA L40", "bf16", 181.05e12), ("NVIDIA L4", "bf16", 121e12),
    ("AMD Instinct MI300X", "bf16", 1307.4e12), ("Tesla T4", "bf16", None),
])
def test_peak_flops_of_common_gpus(name, precision, peak):
    assert device_peak_flops(name, precision) == peak


def _sampler(step: int = 0) -> MixtureSampler:
    sampler = MixtureSampler(np.tile([0.7, 0.3], (6, 1)), [50, 40], 8, seed=0, key="s")
    while sampler.step < step:
        sampler.next_step()
    return sampler


def test_prefetch_hands_out_the_sampler_steps_and_their_state():
    direct = _sampler()
    expected = [direct.next_step() for _ in range(6)]
    seen = []

    def read(step, rows):
        seen.append(step)
        return TokenBatch.plain(torch.from_numpy(rows * 10))

    fetched = Prefetcher(_sampler(), read, 6, pin=False)
    for step, rows in enumerate(expected):
        batch = fetched.next()
        assert torch.equal(batch.tokens.ids, torch.from_numpy(rows * 10))
        assert torch.equal(batch.domains, torch.from_numpy(rows[:, 0]))
        assert fetched.state_dict() == _sampler(step + 1).state_dict()  # not the sampler's, which runs ahead
        assert (fetched.realized_blocks() == _sampler(step + 1).realized_blocks()).all()
    fetched.close()
    assert seen == list(range(6))  # each step read with its own index (MeCo phases read by step)
    resumed = _sampler()
    resumed.load_state_dict(_sampler(3).state_dict())
    again = Prefetcher(resumed, lambda step, rows: TokenBatch.plain(torch.from_numpy(rows)), 6, pin=False)
    assert [again.next().tokens.ids.tolist() for _ in range(3)] == [r.tolist() for r in expected[3:]]
    again.close()


def test_prefetch_raises_the_readers_error_in_the_training_thread():
    def broken(step, rows):
        raise OSError("disk gone")

    fetched = Prefetcher(_sampler(), broken, 4, pin=False)
    with pytest.raises(OSError, match="disk gone"):
        fetched.next()
    fetched.close()
    idle = Prefetcher(_sampler(), lambda step, rows: TokenBatch.plain(torch.from_numpy(rows)), 4, pin=False)
    idle.close()  # a thread blocked on a full queue still ends


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(Path(__file__).parent.parent)]), **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


@pytest.mark.slow
def test_zero3_load_never_holds_the_whole_model_on_a_rank(tmp_path):
    """Two ZeRO-3 processes load a 218 MB checkpoint: each holds half of every weight, reads only
    that half (its resident memory grows by about half the model) and gets the saved values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                                  num_attention_heads=8, vocab_size=tiny.VOCAB, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "num_hidden_layers": 1, "hidden_size": 64,
                                      "intermediate_size": 64})).save_pretrained(tmp_path / "warmup")
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    code = subprocess.run(
        [sys.executable, "-c", "import sys; from cpt.train.launch import relaunch_under_deepspeed as r; "
         "from cpt.config.training import DistributedConfig as D; "
         f"sys.exit(r([{str(tmp_path / 'model')!r}, {str(tmp_path / 'warmup')!r}, {str(tmp_path)!r}], "
         "D(num_processes=2), module='load_probe'))"],
        env=_env(PYTHONPATH=os.pathsep.join([str(BENCHMARKS), str(BENCHMARKS.parent)])), capture_output=True, text=True, timeout=300,
    )
    assert code.returncode == 0, tiny.failure(code.stderr)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["equal"]
    for r in ranks:
        assert r["partitioned"] and r["total"] * 4 == model_bytes
        assert r["held"] == pytest.approx(r["total"] / 2, rel=0.01)
        assert r["visible"] < 0.01 * r["total"]  # outside a forward pass a rank sees only empty placeholders
        growth = r["peak_after"] - max(r["peak_before"], r["rss_before"])
        assert growth < 0.7 * model_bytes, (growth, model_bytes)


TRACKED = """
name: tracked
seed: 0
output_dir: {out}
trackers: [tensorboard, wandb, mlflow]
distributed: {{peak_flops: 1.0e+12}}
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
    memory: {{activation_checkpointing: true}}
    evaluation: {{every: 2, max_tokens_per_domain: 256, harness: {{tasks: []}}}}
"""


@pytest.mark.slow
def test_trackers_receive_every_record_and_records_carry_throughput(tmp_path, monkeypatch):
    recipe = tmp_path / "tracked.yaml"
    recipe.write_text(TRACKED.format(out=tmp_path / "run"))
    env = _env(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(),
               MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "run" / "s" / "metrics.jsonl")
    train = train_records(records)
    model = build_model({"config": {**tiny.ARCHS["llama"], "vocab_size": 384}})
    flops = model_flops_per_token(model, 32)
    for r in train:
        assert r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e12, rel=1e-9)
    expected = {}  # (metric, updates done) -> value, as every tracker must hold them
    for r in records:
        updates = r["step"] + (r.get("kind") != "eval")
        for key in ("loss", "eval/prose/loss"):
            if key in r:
                expected[key, updates] = r[key]
    assert len(expected) == 4 + 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "s" / "tensorboard"))
    events.Reload()
    board = {(k, e.step): e.value for k in ("loss", "eval/prose/loss") for e in events.Scalars(k)}

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.run_name == "s" and run.info.status == "FINISHED"
    flow = {(k, m.step): m.value for k in ("loss", "eval/prose/loss")
            for m in client.get_metric_history(run.info.run_id, mlflow_key(k))}

    (log,) = (tmp_path / "run" / "s" / "wandb").glob("offline-run-*/run-*.wandb")
    inspected = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], env=env,
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    history = [json.loads(line)["history"] for line in inspected.stdout.splitlines() if '"type":"history"' in line]
    wandb = {(k, h["item"]["_step"]): h["item"][k] for h in history for k in ("loss", "eval/prose/loss") if k in h["item"]}
    for name, got in {"tensorboard": board, "mlflow": flow, "wandb": wandb}.items():
        assert got.keys() == expected.keys(), name
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (name, key)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_with_node_local_caches_train_as_one_node(tmp_path):
    """Two torchrun agents over 127.0.0.1 (one process each, each node its own data cache) train the
    steps that two processes on one node train: the same per-domain tokens, losses within 1e-5."""
    from test_faults import write_recipe

    recipe = write_recipe(tmp_path, zero=2, procs=2)
    short = ["--set", "stages.s.steps=4", "--set", "stages.s.evaluation.enabled=false"]
    one = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(recipe), "--output-dir", str(tmp_path / "one"), *short],
                         env=_env(CPT_CACHE_DIR=str(tmp_path / "cache-one")), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "cpt.cli", "run", str(recipe), "--output-dir", str(tmp_path / "two"), *short],
            env=_env(CPT_CACHE_DIR=str(tmp_path / f"cache-node{node}"), OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    logs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    for node in (0, 1):  # each node filled its own cache
        assert any((tmp_path / f"cache-node{node}").rglob("tokenizer.json"))
    mine, theirs = (train_records(read_metrics(tmp_path / d / "s" / "metrics.jsonl")) for d in ("two", "one"))
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for a, b in zip(mine, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert _tokens(a) == _tokens(b)


def _tokens(record: dict) -> dict:
    return {k: v for k, v in record.items() if k == "tokens" or k.startswith("tokens/")}
