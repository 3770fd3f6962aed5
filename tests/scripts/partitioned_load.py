"""Run under the deepspeed launcher by tests/test_scale.py: ``partitioned_load MODEL_DIR WARMUP_DIR OUT_DIR``.

Every rank loads the HF model in MODEL_DIR as ZeRO-3 partitions the way a stage does, and reports
its resident memory before and after (the peak, from the kernel), the sizes of the parts it
holds, and (rank 0, gathered one weight at a time) whether every weight equals the checkpoint's.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.train.engine import ds_config, import_deepspeed, init_distributed, partitioned_building
from cpt.train.launch import distributed_context
from cpt.train.model import build_model


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(model_dir: Path, warmup_dir: Path, out: Path) -> None:
    deepspeed = import_deepspeed()
    init_distributed()
    rank = distributed_context().rank
    config = ds_config(DistributedConfig(zero_stage=3, num_processes=2), OptimizerConfig(), 1, 1, hidden_size=64)
    with partitioned_building(config):  # pays the one-time costs (imports, buffers) of building partitions
        build_model(str(warmup_dir), partitioned=True)
    before = psutil.Process().memory_info().rss
    peak_before = peak_rss()
    with partitioned_building(config) as partitioned:
        model = build_model(str(model_dir), partitioned=partitioned)
    report = {
        "rss_before": before,
        "peak_before": peak_before,
        "peak_after": peak_rss(),
        "partitioned": partitioned,
        "held": sum(p.ds_tensor.numel() for p in model.parameters()),
        "visible": sum(p.numel() for p in model.parameters()),
        "total": sum(p.ds_numel for p in model.parameters()),
    }
    if rank == 0:
        saved = load_file(model_dir / "model.safetensors")
    equal = True
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if rank == 0:
                equal &= torch.equal(p.data, saved[name])
    report["equal"] = equal
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
