"""One rank's side of a ZeRO-3 load, run under the deepspeed launcher by benchmarks/memory.py and
tests/test_scale.py: ``python -m load_probe MODEL_DIR WARMUP_DIR OUT_DIR`` (benchmarks/ on the path).

Every rank first loads the small model in WARMUP_DIR (paying the one-time costs of building
partitions: imports, communication buffers), then the HF model in MODEL_DIR as ZeRO-3 partitions
the way a stage does. It writes OUT_DIR/rank-<r>.json: its resident memory before that load and
its peak after it (the kernel's high-water mark), the sizes of the parts it holds, and (rank 0,
gathered one weight at a time) whether every weight equals the checkpoint's.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

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
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    config = ds_config(DistributedConfig(zero_stage=3, num_processes=2), OptimizerConfig(), 1, 1, hidden_size=hidden)
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
    equal = True
    with safe_open(model_dir / "model.safetensors", "pt") as saved:  # one weight at a time
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    equal &= torch.equal(p.data, saved.get_tensor(name))
    report["equal"] = equal
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
