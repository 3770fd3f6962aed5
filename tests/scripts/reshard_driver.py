"""Run by tests/test_reshard.py, alone or under a launcher: ``reshard_driver OUT TOKENIZER_DIR STAGES PHASE...``.

STAGES is a comma-separated list of ZeRO stages. Each PHASE runs on this launch's W processes:

- ``run``: train ``STEPS`` steps over a global sampler, checkpointing after ``SAVE_AT``; the
  uninterrupted run of W processes. Writes ``OUT/z<S>/w<W>/``.
- ``resume:<N>``: resume the W-process engine from ``OUT/z<S>/w<N>/`` and train to the end.
  Writes ``OUT/z<S>/w<N>-to-w<W>/``.

Each phase writes the step losses and an EMA checksum (rank 0, ``result.json``) and every rank's
sampled rows (``rows-<rank>.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tiny
import torch
from transformers import AutoTokenizer

from cpt.data.sampler import MixtureSampler
from cpt.train import checkpoint
from cpt.train.ema import Ema
from cpt.train.engine import DistributedConfig, OptimizerConfig, build_engine
from cpt.train.export import gather_state_dict
from cpt.train.launch import distributed_context
from cpt.train.model import build_model, resize_for_tokenizer

STEPS, SAVE_AT, BATCH, MICRO, BLOCKS = 6, 3, 4, 2, 24
LRS = [3e-3, 1e-2, 5e-3, 8e-3, 2e-3, 6e-3]


def trainer_for(stage: int, world_size: int, tokenizer, seed: int):
    torch.manual_seed(seed)
    # Odd sizes (norms of 33, projections of 33 x 63), so that ZeRO-3 pads the last partition of two.
    odd = {"hidden_size": 33, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 63}
    model = build_model({"config": {**tiny.ARCHS["llama"], **odd}})
    resize_for_tokenizer(model, tokenizer)
    dist = DistributedConfig(zero_stage=stage, num_processes=world_size)
    return build_engine(model, dist, OptimizerConfig(), LRS.__getitem__, MICRO, BATCH // world_size // MICRO)


def ema_checksums(trainer, ema: Ema) -> list[float] | None:
    """A position-weighted sum of each averaged weight, so that misplaced elements show."""
    with ema.applied():
        state = gather_state_dict(trainer)
    if state is None:
        return None
    names = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    return [float((state[n].double().flatten() * torch.linspace(1, 2, state[n].numel(), dtype=torch.float64)).sum())
            for n in names]


def phase(out: Path, tokenizer, data: torch.Tensor, stage: int, source: int | None) -> None:
    ctx = distributed_context()
    trainer = trainer_for(stage, ctx.world_size, tokenizer, seed=0 if source is None else 1)
    ema = Ema(trainer.module, decay=0.8)
    sampler = MixtureSampler(np.ones((STEPS, 1)), [BLOCKS], BATCH, 0, "reshard", ctx.rank, ctx.world_size)
    start = 0
    here = out / f"z{stage}" / (f"w{ctx.world_size}" if source is None else f"w{source}-to-w{ctx.world_size}")
    if source is not None:
        ckpt = checkpoint.step_dir(out / f"z{stage}" / f"w{source}" / "ckpt", SAVE_AT)
        client = checkpoint.load(trainer, ckpt)  # another world size: converted by cpt.train.reshard
        sampler.load_state_dict(client["sampler"])
        ema.load_state_dict(checkpoint.load_rank_tensors(ckpt, ctx.rank, ctx.world_size,
                                                         dict(zip(ema.state_dict(), ema.params))))
        start = client["step"]
    losses, rows = {}, {}
    for step in range(start, STEPS):
        picked = sampler.next_step()
        rows[step] = picked[:, 1].tolist()
        result = trainer.train_step(list(data[picked[:, 1]].split(MICRO)), step)
        ema.update()
        losses[step] = result.loss
        if step + 1 == SAVE_AT and source is None:
            client = {"step": SAVE_AT, "sampler": sampler.state_dict()}
            checkpoint.save(trainer, here / "ckpt", SAVE_AT, client, tokenizer=tokenizer, rank_tensors=ema.state_dict())
    checksums = ema_checksums(trainer, ema)
    here.mkdir(parents=True, exist_ok=True)
    (here / f"rows-{ctx.rank}.json").write_text(json.dumps(rows))
    if ctx.rank == 0:
        (here / "result.json").write_text(json.dumps({"losses": losses, "ema": checksums}))


def main(out: Path, tok_dir: Path, stages: str, phases: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = tiny.blocks(tokenizer, BLOCKS)
    for name in phases:
        for stage in map(int, stages.split(",")):
            phase(out, tokenizer, data, stage, None if name == "run" else int(name.split(":")[1]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
