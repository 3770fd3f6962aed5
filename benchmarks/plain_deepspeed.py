"""The plain DeepSpeed baseline of benchmarks/memory.py, run under the deepspeed launcher:
``plain_deepspeed.py MODEL_CONFIG_JSON VOCAB STEPS SEQ_LEN``.

What a careful user writes without cpt: the model built under ``zero.Init`` through transformers'
``HfDeepSpeedConfig``, ZeRO-3 buckets sized for the model as transformers' integration sizes them,
torch's AdamW, one micro-batch of random tokens per rank and step. No checkpoint, no export.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402


def main(model: dict, vocab: int, steps: int, seq_len: int) -> None:
    deepspeed.init_distributed()
    h = model["hidden_size"]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                              "stage3_param_persistence_threshold": 10 * h},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (transformers reads it through a weak reference)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model, vocab_size=vocab))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(engine.global_rank)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (1, seq_len), generator=g).to(engine.device)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
