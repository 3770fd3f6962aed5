"""Training throughput of cpt's engine on GPUs: a Llama-style 1B in bf16 under ZeRO-2, with and
without activation checkpointing, in tokens/s per GPU and MFU (PaLM's model FLOPs, see
cpt/train/throughput.py, over the GPU's dense bf16 peak).

The model: hidden 2048, 16 layers, 32 heads, vocab 128256, seq 4096 (Llama 3.2 1B's shape). Both
settings run in this one process group, side by side, on random tokens; the first steps of each
are warm-up. Anchors on one H100: OLMo-core about 45-55k tokens/s/GPU for 1B at seq 4096, LLM
Foundry 38.5k (40% MFU).

    python benchmarks/gpu_throughput.py                             # one GPU
    deepspeed --num_gpus 8 benchmarks/gpu_throughput.py             # every GPU of the node
    python benchmarks/gpu_throughput.py --hidden 64 --layers 2 --heads 4 --vocab 512 --seq-len 128   # a CPU smoke run

Last line: JSON {"gpus", "device", "runs": [{"activation_checkpointing", "micro_batch", "tokens_per_s_per_gpu", "mfu"}]}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.engine import build_engine, ds_config, free_memory, init_distributed
from cpt.train.model import build_model, enable_activation_checkpointing
from cpt.train.throughput import local_peak_flops, mfu, model_flops_per_token


def measure(args, checkpointed: bool, micro: int, distributed: DistributedConfig) -> dict:
    config = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.intermediate or 4 * args.hidden,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads or args.heads,
              "vocab_size": args.vocab, "max_position_embeddings": args.seq_len}
    torch.manual_seed(0)
    model = build_model({"config": config}, dtype=torch.bfloat16 if distributed.precision == "bf16" else torch.float32)
    if checkpointed:
        enable_activation_checkpointing(model, "memory.activation_checkpointing")
    opt = OptimizerConfig()
    engine = build_engine(model, distributed, opt, lambda t: 1e-4, micro, 1,
                          config=ds_config(distributed, opt, micro, 1, hidden_size=args.hidden))
    g = torch.Generator().manual_seed(engine.rank)
    batches = [torch.randint(0, args.vocab, (micro, args.seq_len), generator=g) for _ in range(4)]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for t in range(args.warmup):
        engine.train_step([batches[t % 4]], t).loss
    sync()
    start = time.perf_counter()
    for t in range(args.steps):
        result = engine.train_step([batches[t % 4]], t)
    result.loss  # waits for the device
    sync()
    seconds = time.perf_counter() - start
    per_gpu = args.steps * micro * args.seq_len / seconds
    peak = local_peak_flops(engine.device, distributed.precision)
    flops = model_flops_per_token(engine.module, args.seq_len)
    run = {"activation_checkpointing": checkpointed, "micro_batch": micro, "tokens_per_s_per_gpu": round(per_gpu),
           "mfu": round(mfu(per_gpu, flops, peak, 1), 4) if peak else None,
           "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if engine.device.type == "cuda" else None}
    engine.close()
    del engine, model
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=2, help="sequences per GPU and step without checkpointing")
    ap.add_argument("--micro-ckpt", type=int, default=8, help="... and with it (it frees the memory for more)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    init_distributed()
    gpu = torch.cuda.is_available()
    distributed = DistributedConfig(zero_stage=2, precision="bf16" if gpu else "fp32")
    runs = [measure(args, False, args.micro, distributed), measure(args, True, args.micro_ckpt, distributed)]
    if torch.distributed.get_rank() == 0:
        device = torch.cuda.get_device_name() if gpu else "cpu"
        print(json.dumps({"gpus": torch.distributed.get_world_size(), "device": device, "runs": runs}))


if __name__ == "__main__":
    main()
