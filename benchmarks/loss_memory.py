"""Memory and time of the output layer's loss: full fp32 logits against :func:`linear_cross_entropy`.

One sequence at Llama 3's vocabulary (128256 entries, hidden size 2048, 2048 tokens, batch 1),
fp32, on the CPU: hidden states in; the loss and the gradients of the hidden states and of the
output layer's weight out. Two variants:

- ``full``: ``F.cross_entropy(hidden @ W.T, targets)``, the (tokens, vocabulary) logits
  materialised and differentiated by autograd;
- ``chunked``: :func:`cpt.train.loss.linear_cross_entropy`, which never holds more than one
  chunk of logits and makes its gradients in the forward pass.

Figures:

- ``chunked_ce_peak_over_full``: the memory the loss adds above the output layer's weight and its
  gradient (and the hidden states and theirs), chunked over full. Each variant runs in a fresh
  process that first warms its kernels up on a tiny shape, then allocates the weight, hidden
  states and targets (filled in place, so setup has no transient above its resident size) and
  records its resident memory; the figure is the process's high-water mark (``ru_maxrss``) after
  one forward and backward, minus that baseline, minus the two gradients that the run leaves in
  ``.grad`` (the first backward of a step creates them, as training's does). The chunked loss
  makes the weight's gradient in its forward pass and hands that very tensor to autograd, which
  keeps it as ``.grad``; were it copied instead, the copy would show here;
- ``chunked_ce_time_over_full``: median wall time of forward and backward, chunked over full,
  both measured in one process, alternating, after one untimed run of each;
- ``compiled_step_over_eager``: seconds per optimizer step of the quickstart model (cpt's ZeRO-0
  engine, one process, fp32, 16 x 128 tokens, document masking) with ``stages[].compile`` (each
  block compiled by inductor) over eager, the best of interleaved rounds after warm-up steps that
  include the compilation. Above 1 means compiling made the step slower.

    python benchmarks/loss_memory.py [--quick] [--repeats 3] [--chunk-tokens N]

Last line: JSON of the figures and their details (MiB, seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cpt.train.loss import default_chunk_tokens, linear_cross_entropy  # noqa: E402

SHAPE = {"vocab": 128256, "hidden": 2048, "tokens": 2048}
QUICK_SHAPE = {"vocab": 32000, "hidden": 256, "tokens": 1024}
WARMUP_SHAPE = {"vocab": 512, "hidden": 64, "tokens": 64}
MiB = 2**20


def use_all_cores() -> int:
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def tensors(shape: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight, hidden states (no gradients yet) and targets, filled in place."""
    g = torch.Generator().manual_seed(0)
    weight = torch.empty(shape["vocab"], shape["hidden"]).normal_(0, 0.02, generator=g).requires_grad_()
    hidden = torch.empty(shape["tokens"], shape["hidden"]).normal_(generator=g).requires_grad_()
    targets = torch.randint(0, shape["vocab"], (shape["tokens"],), generator=g)
    return weight, hidden, targets


def run(variant: str, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None) -> None:
    """One forward and backward of the mean loss over the tokens; gradients go to ``.grad`` (created
    by the first run, added into by the next, as in training)."""
    if variant == "full":
        loss = F.cross_entropy(hidden @ weight.T, targets)
    else:
        loss, _ = linear_cross_entropy(hidden, weight, targets, 1 / len(targets), chunk_tokens=chunk)
    loss.backward()


def peak_in_this_process(variant: str, shape: dict, chunk: int | None) -> dict:
    """Resident memory before and the high-water mark after one run, in bytes (Linux ``ru_maxrss`` is KiB)."""
    use_all_cores()
    run(variant, *tensors(WARMUP_SHAPE), chunk)
    weight, hidden, targets = tensors(shape)
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    baseline_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run(variant, weight, hidden, targets, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (weight, hidden))
    return {"baseline": baseline, "baseline_hwm": baseline_hwm, "peak": peak, "grads": grads}


def measure_loss_memory(shape: dict = SHAPE, chunk: int | None = None) -> dict:
    """Memory each variant adds above its setup, each measured in its own fresh process."""
    added = {}
    for variant in ("full", "chunked"):
        argv = [sys.executable, __file__, "--child", variant, "--shape", json.dumps(shape)]
        if chunk:
            argv += ["--chunk-tokens", str(chunk)]
        out = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        if out["peak"] <= out["baseline_hwm"]:
            raise RuntimeError(f"{variant}: the run stayed below setup's high-water mark, its peak is unknown: {out}")
        added[variant] = (out["peak"] - out["baseline"] - out["grads"]) / MiB
        added[f"{variant}_setup"] = out["baseline"] / MiB, (out["baseline_hwm"] - out["baseline"]) / MiB
    return {
        "chunked_ce_peak_over_full": round(added["chunked"] / added["full"], 3),
        "full_added_mib": round(added["full"], 1),
        "chunked_added_mib": round(added["chunked"], 1),
        "baseline_mib": round(added["full_setup"][0], 1),
        "setup_overshoot_mib": round(max(added["full_setup"][1], added["chunked_setup"][1]), 1),
    }


def measure_loss_time(shape: dict = SHAPE, chunk: int | None = None, repeats: int = 3) -> dict:
    """Median seconds of forward and backward per variant, alternating in this process."""
    threads = use_all_cores()
    weight, hidden, targets = tensors(shape)
    wall: dict[str, list[float]] = {"full": [], "chunked": []}
    cpu: dict[str, list[float]] = {"full": [], "chunked": []}
    for i in range(repeats + 1):
        for variant in ("full", "chunked") if i % 2 else ("chunked", "full"):
            start, start_cpu = time.perf_counter(), time.process_time()
            run(variant, weight, hidden, targets, chunk)
            if i:  # the first round warms up
                wall[variant].append(time.perf_counter() - start)
                cpu[variant].append(time.process_time() - start_cpu)
    full, chunked = statistics.median(wall["full"]), statistics.median(wall["chunked"])
    return {
        "chunked_ce_time_over_full": round(chunked / full, 3),
        "full_s": round(full, 2),
        "chunked_s": round(chunked, 2),
        "full_runs_s": [round(s, 2) for s in wall["full"]],
        "chunked_runs_s": [round(s, 2) for s in wall["chunked"]],
        # CPU seconds of all threads: less sensitive than wall time to other work on a shared machine
        "chunked_cpu_over_full": round(statistics.median(cpu["chunked"]) / statistics.median(cpu["full"]), 3),
        "threads": threads,
    }


def measure_compiled_step(steps: int = 10, rounds: int = 3, warmup: int = 3) -> dict:
    """Seconds per optimizer step of the quickstart model (ZeRO-0 engine, one process, fp32, seq 128,
    batch 16, document masking) with its blocks compiled and eager, in interleaved rounds."""
    import yaml

    from cpt.config.training import DistributedConfig, OptimizerConfig
    from cpt.data.blocks import TokenBatch
    from cpt.train.engine import build_engine
    from cpt.train.model import build_model, compile_blocks

    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["stages"][0]
    config = dict(recipe["model"]["config"], vocab_size=recipe["tokenizer"]["train"]["vocab_size"])
    seq_len, batch = recipe["seq_len"], recipe["batch"]["micro_batch_size"]
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(steps + warmup):
        ids = torch.randint(0, config["vocab_size"], (batch, seq_len), generator=g)
        positions = torch.arange(seq_len).remainder(40).expand(batch, -1).contiguous()  # documents of 40 tokens
        data.append(TokenBatch(ids, TokenBatch.plain(ids).targets, positions))

    def engine(compiled: bool):
        torch.manual_seed(0)
        model = build_model({"config": config})
        if compiled:
            compile_blocks(model, "benchmark")
        return build_engine(model, DistributedConfig(), OptimizerConfig(), lambda t: 1e-3, batch, 1)

    def timed(trainer) -> float:
        for t, tokens in enumerate(data[:warmup]):
            trainer.train_step([tokens], t)
        started = time.perf_counter()
        for t, tokens in enumerate(data[warmup:]):
            trainer.train_step([tokens], t).loss  # reading the loss waits for the step
        return (time.perf_counter() - started) / steps

    eager, compiled = engine(False), engine(True)
    seconds = {"eager": [], "compiled": []}
    for _ in range(rounds):
        seconds["eager"].append(timed(eager))
        seconds["compiled"].append(timed(compiled))
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "compiled_step_over_eager": round(best["compiled"] / best["eager"], 3),
        "eager_step_s": round(best["eager"], 4),
        "compiled_step_s": round(best["compiled"], 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a small smoke shape {QUICK_SHAPE}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default: the library's rule)")
    parser.add_argument("--child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(peak_in_this_process(args.child, args.shape, args.chunk_tokens)))
        return {}

    shape = QUICK_SHAPE if args.quick else SHAPE
    chunk = args.chunk_tokens or default_chunk_tokens(shape["vocab"], torch.device("cpu"))
    figures = {**measure_loss_memory(shape, chunk), **measure_loss_time(shape, chunk, args.repeats),
               **shape, "chunk_tokens": chunk, **measure_compiled_step(steps=3 if args.quick else 10)}
    print(f"loss of {shape['tokens']} tokens, vocabulary {shape['vocab']}, hidden {shape['hidden']}, fp32, "
          f"{figures['threads']} threads, {chunk} tokens per chunk")
    rows = [("full", figures["full_added_mib"], figures["full_s"]),
            ("chunked", figures["chunked_added_mib"], figures["chunked_s"]),
            ("chunked/full", figures["chunked_ce_peak_over_full"], figures["chunked_ce_time_over_full"])]
    print(f"{'':<14}{'added peak MiB':>16}{'median s':>10}")
    for name, mib, seconds in rows:
        print(f"{name:<14}{mib:>16.4g}{seconds:>10.4g}")
    print(f"quickstart step, compiled blocks: {figures['compiled_step_s']:.3f} s, eager {figures['eager_step_s']:.3f} s "
          f"(compiled/eager {figures['compiled_step_over_eager']:.3f}; above 1 is slower)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
