"""Saves checkpoints of a tiny model forever: ``save_loop ROOT TOKENIZER_DIR``; killed by the test.

Prints ``save-loop saving N <time>`` before and ``save-loop saved N <time>`` after each save, so the test can aim its
SIGKILL at the middle of one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import tiny
import torch
from transformers import AutoTokenizer

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.checkpoint import save
from cpt.train.engine import build_engine
from cpt.train.model import build_model

root, tokenizer = Path(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[2])
torch.manual_seed(0)
trainer = build_engine(build_model(tiny.model_spec("llama")), DistributedConfig(zero_stage=1), OptimizerConfig(), lambda t: 1e-3, 2, 1)
batch = [tiny.blocks(tokenizer, 2)]
step = 0
while True:
    trainer.train_step(batch, step)
    step += 1
    print(f"save-loop saving {step} {time.monotonic()}", flush=True)
    save(trainer, root, step, {"step": step}, tokenizer=tokenizer, keep=2)
    print(f"save-loop saved {step} {time.monotonic()}", flush=True)
