"""Every collective operation of cpt goes through here.

NCCL (DeepSpeed's process group on GPUs) accepts only tensors on the process's own device, where
gloo (the CPU tests) accepts anything; a CPU tensor handed to NCCL crashes a multi-GPU run at its
first step. Each helper therefore takes the device to reduce on, and nothing else in the package
calls ``torch.distributed``'s collectives (a test checks this).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

Op = Literal["sum", "max", "min"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, op: Op = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks; it must already live on the engine's device."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=_OPS[op])
    return tensor


def reduce_values(values: Sequence[float], device: torch.device, op: Op = "sum") -> list[float]:
    """Reduce a few Python numbers over all ranks in one float64 collective on ``device``."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    return all_reduce(tensor, op).tolist()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, device: torch.device, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; the buffer travels on ``device``)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]
