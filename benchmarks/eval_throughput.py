"""Evaluation vs training throughput on the quickstart model (issue 4: evaluation >= 2x training).

Both go through cpt's own code: ``StepEngine.train_step`` (DeepSpeed, ZeRO 0, one process) and
``heldout_losses`` (the evaluation hook), on the same model, batch size and sequence length,
in interleaved rounds in one run (the best round of each counts). Last line is JSON:
{"train_tokens_per_s", "eval_tokens_per_s", "eval_vs_train"}.

    python benchmarks/eval_throughput.py [--steps 10] [--rounds 3] [--seq-len 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cpt.eval.heldout import heldout_losses  # noqa: E402
from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.engine import build_engine  # noqa: E402
from cpt.train.model import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()

    stage = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["stages"][0]
    torch.manual_seed(0)
    model = build_model({"config": dict(stage["model"]["config"], vocab_size=args.vocab)})
    trainer = build_engine(model, DistributedConfig(), OptimizerConfig(), lambda t: 1e-3, args.batch, 1)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, args.vocab, size=(args.steps * args.batch, args.seq_len))
    tokens = blocks.size

    def train() -> float:
        t0 = time.perf_counter()
        for i in range(args.steps):
            trainer.train_step([torch.from_numpy(blocks[i * args.batch : (i + 1) * args.batch])], i)
        return tokens / (time.perf_counter() - t0)

    def evaluate() -> float:
        t0 = time.perf_counter()
        heldout_losses(trainer.module, {"bench": blocks}, args.batch, trainer.device)
        return tokens / (time.perf_counter() - t0)

    train(), evaluate()  # warm up both paths
    best_train = best_eval = 0.0
    for r in range(args.rounds):
        tr, ev = train(), evaluate()
        best_train, best_eval = max(best_train, tr), max(best_eval, ev)
        print(f"round {r + 1}: train {tr:,.0f} tokens/s, eval {ev:,.0f} tokens/s, ratio {ev / tr:.2f}")
    print(json.dumps({"train_tokens_per_s": round(best_train), "eval_tokens_per_s": round(best_eval),
                      "eval_vs_train": round(best_eval / best_train, 3)}))


if __name__ == "__main__":
    main()
