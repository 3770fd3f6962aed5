"""Trainer overhead: cpt's DeepSpeed engine (ZeRO 0, one process) vs a bare PyTorch loop vs the HF Trainer.

Same model (the quickstart Llama), batch, AdamW settings, gradient clipping and number of steps
for all three, measured in interleaved rounds in one run (machines are noisy; the best round of
each counts). Last line is JSON: {"cpt_vs_bare": r1, "cpt_vs_hf_trainer": r2} (throughput
ratios, higher is better for cpt).

    python benchmarks/trainer_overhead.py [--steps 20] [--rounds 3] [--seq-len 128] [--batch 16]
    python benchmarks/trainer_overhead.py --gpu --hidden 768 --layers 12 ...   # on a GPU, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.engine import build_engine  # noqa: E402
from cpt.train.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


def quickstart_config(args) -> dict:
    stage = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["stages"][0]
    config = dict(stage["model"]["config"], vocab_size=args.vocab)
    if args.hidden:
        config.update(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    config["max_position_embeddings"] = max(config["max_position_embeddings"], args.seq_len)
    return config


def fresh_model(config: dict, device: str):
    torch.manual_seed(0)
    return build_model({"config": config}).to(device)


def batches(args, device: str, n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device) for _ in range(n)]


def timed(step_fn, data, warmup: int, sync) -> float:
    for ids in data[:warmup]:
        step_fn(ids)
    sync()
    t0 = time.perf_counter()
    for ids in data[warmup:]:
        step_fn(ids)
    sync()
    return time.perf_counter() - t0


def run_cpt(config, args, device, sync) -> float:
    dist = DistributedConfig(zero_stage=0, precision="bf16" if args.gpu else "fp32")
    opt = OptimizerConfig(weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0)
    trainer = build_engine(fresh_model(config, device), dist, opt, lambda t: LR, args.batch, 1)
    data = batches(args, device, args.steps + args.warmup)
    counter = iter(range(10**9))
    return timed(lambda ids: trainer.train_step([ids], next(counter)), data, args.warmup, sync)


def run_bare(config, args, device, sync) -> float:
    model = fresh_model(config, device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95), eps=1e-8)

    def step(ids):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.gpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # every loop reads its loss, as a training loop logs it

    return timed(step, batches(args, device, args.steps + args.warmup), args.warmup, sync)


def run_hf_trainer(config, args, device, sync) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{"input_ids": ids, "labels": ids} for ids in batches(args, "cpu", args.steps + args.warmup)]
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                sync()
                marks["start"] = time.perf_counter()

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(data) * args.batch

        def __getitem__(self, i):
            row = data[i // args.batch]["input_ids"][i % args.batch]
            return {"input_ids": row, "labels": row}

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps + args.warmup,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=10**9, save_strategy="no",
            report_to=[], dataloader_num_workers=0, use_cpu=not args.gpu, bf16=args.gpu, disable_tqdm=True,
        )
        trainer = Trainer(model=fresh_model(config, device), args=training, train_dataset=Blocks(), callbacks=[Clock()])
        trainer.train()
        sync()
        return time.perf_counter() - marks["start"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=0, help="override the model width (GPU runs)")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    config = quickstart_config(args)
    runners = {"cpt": run_cpt, "bare": run_bare, "hf_trainer": run_hf_trainer}
    best = {name: float("inf") for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            best[name] = min(best[name], runner(config, args, device, sync))
    tokens = args.steps * args.batch * args.seq_len
    params = sum(p.numel() for p in fresh_model(config, "cpu").parameters())
    for name, seconds in best.items():
        line = f"{name:<11} {seconds:8.3f} s for {args.steps} steps  {tokens / seconds:12,.0f} tokens/s"
        if args.gpu:
            flops = 6 * params * tokens / seconds  # matmul FLOPs; attention adds a little more
            peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12  # H100 SXM dense bf16
            line += f"  MFU {flops / peak:.1%}"
        print(line)
    print(f"model: {params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len}")
    print(json.dumps({"cpt_vs_bare": round(best["bare"] / best["cpt"], 3),
                      "cpt_vs_hf_trainer": round(best["hf_trainer"] / best["cpt"], 3)}))


if __name__ == "__main__":
    main()
