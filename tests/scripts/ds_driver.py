"""Run under a launcher by tests/test_engine.py: ``ds_driver OUT_DIR TOKENIZER_DIR [SETTING ...]``.

For each ZeRO setting, on every rank: train 4 steps on a fixed per-rank batch, save a checkpoint
and export the live model, train 2 more steps; then load the checkpoint into a fresh engine (other
initial weights) and train the same 2 steps. Rank 0 writes what the test checks to results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tiny
import torch
from transformers import AutoTokenizer

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.checkpoint import load, save
from cpt.train.engine import build_engine
from cpt.train.export import export_hf, gather_state_dict
from cpt.train.launch import distributed_context
from cpt.train.model import build_model, resize_for_tokenizer

SETTINGS = {
    "z0-fp32": DistributedConfig(zero_stage=0, num_processes=2),
    "z1-fp32": DistributedConfig(zero_stage=1, num_processes=2),
    "z2-fp32": DistributedConfig(zero_stage=2, num_processes=2),
    "z3-fp32": DistributedConfig(zero_stage=3, num_processes=2),
    "z2-bf16-offload": DistributedConfig(zero_stage=2, num_processes=2, precision="bf16", offload_optimizer=True),
}


def trainer_for(dist: DistributedConfig, tokenizer, seed: int):
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = build_model(tiny.model_spec("llama"))
    resize_for_tokenizer(model, tokenizer)
    return build_engine(model, dist, OptimizerConfig(), lambda t: 5e-3 * (1 + t % 3), micro_batch_size=2, grad_accum=2)


def weights_agree_across_ranks(trainer) -> bool:
    """ZeRO-3 holds different shards per rank; the other stages must hold identical full weights."""
    if trainer.zero_stage == 3:
        return True
    total = torch.stack([p.detach().double().sum() for p in trainer.module.parameters()]).sum().reshape(1)
    everyone = [torch.zeros_like(total) for _ in range(trainer.world_size)]
    torch.distributed.all_gather(everyone, total)
    return all(torch.equal(everyone[0], x) for x in everyone)


def main(out: Path, tok_dir: Path, names: list[str]) -> None:
    ctx = distributed_context()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = tiny.blocks(tokenizer, 4, offset=4 * ctx.rank)  # each rank its own fixed batch
    batch = [data[:2], data[2:]]
    results = {}
    for name in names:
        dist = SETTINGS[name]
        trainer = trainer_for(dist, tokenizer, seed=0)
        steps = [trainer.train_step(batch, t) for t in range(4)]
        save(trainer, out / name / "ckpt", 4, {"step": 4, "tokens": [1, 2]}, tokenizer=tokenizer, keep=1)
        export_hf(trainer, tokenizer, out / name / "live-step-4")
        continued = [trainer.train_step(batch, t).loss for t in (4, 5)]
        original = gather_state_dict(trainer)
        agree = weights_agree_across_ranks(trainer)

        resumed_trainer = trainer_for(dist, tokenizer, seed=1)
        client_state = load(resumed_trainer, out / name / "ckpt" / "step-4")
        resumed = [resumed_trainer.train_step(batch, t).loss for t in (4, 5)]
        again = gather_state_dict(resumed_trainer)
        for done in (trainer, resumed_trainer):  # as a run closes each stage's engine
            done.close()
        if ctx.rank == 0:
            results[name] = {
                "world_size": trainer.world_size,
                "losses": [s.loss for s in steps],
                "grad_norms": [s.grad_norm for s in steps],
                "continued": continued,
                "resumed": resumed,
                "client_state": client_state,
                "max_weight_diff": max(float((original[k].double() - again[k].double()).abs().max()) for k in original),
                "ranks_agree": agree,
            }
    if ctx.rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or list(SETTINGS))
