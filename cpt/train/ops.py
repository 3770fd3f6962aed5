"""DeepSpeed's just-in-time built ops (CPU Adam, CPU shared-memory collectives), loaded so that a
process killed while loading one cannot leave every later run waiting.

PyTorch builds and loads such an op under a lock *file* in the op's build directory, created on
every load (even when nothing needs building) and removed afterwards; a process killed in between
(``kill -9``, a job's time limit, an out-of-memory kill) leaves the file behind, and every later
load on that machine sleeps forever waiting for it to go. cpt loads ops while holding an OS file
lock of its own, which the kernel releases when its holder dies: whoever holds it knows that a
PyTorch lock file still present belongs to a dead process, and removes it. The ops it loads stay
in DeepSpeed's per-process cache, so DeepSpeed's own later loads never touch the lock file again.

The shared-memory op maps a named buffer per rank (about 69 MB of RAM in /dev/shm) when every rank
runs on one machine; a killed run would leave the names, and their memory, until the machine
reboots. Once every rank has mapped every buffer, the names go: the memory stays mapped while the
run lives and returns to the system when its last process exits, however it exits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from filelock import FileLock

from cpt import dist

log = logging.getLogger(__name__)

SHARED_MEMORY_COMM = "ShareMemCommBuilder"  # built by deepspeed.init_distributed on the CPU accelerator
CPU_ADAM = "CPUAdamBuilder"  # built by DeepSpeedCPUAdam (optimizer offload)


def op_directories(*builders: str) -> list[Path]:
    """Where PyTorch builds the ops of ``builders`` (class names of DeepSpeed op builders; those the
    accelerator lacks or cannot build are skipped) for this Python and torch build: under
    TORCH_EXTENSIONS_DIR, or ~/.cache/torch_extensions/py311_cpu, say."""
    return [_build_directory(op) for op in _builders(builders)]


def op_lock(directories: list[Path]) -> FileLock:
    """This machine's lock over loading ops built in ``directories`` (the kernel drops it if its holder dies)."""
    return FileLock(directories[0].parent / "cpt-ops.lock", thread_local=False)


def load_ops(*builders: str) -> None:
    """Load the ops of ``builders`` into this process, building them where needed, under the
    machine's op lock, after removing the lock files that killed processes left behind."""
    ops = _builders(builders)
    if not ops:
        return
    directories = [_build_directory(op) for op in ops]
    with op_lock(directories):
        for directory in directories:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing %s, left by a process killed while it loaded DeepSpeed's %s op", stale,
                            directory.name)
                stale.unlink(missing_ok=True)
        for op in ops:
            op.load()


def unlink_shared_memory() -> None:
    """Remove the name of this rank's shared-memory buffer once every rank has mapped them all.
    Collective: every rank calls it right after ``deepspeed.init_distributed``."""
    import deepspeed

    rank, world_size = torch.distributed.get_rank(), dist.world_size()
    # DeepSpeed maps the buffers when LOCAL_SIZE (set by its launcher) equals the world size (shm_interface.cpp)
    if deepspeed.get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    dist.barrier()  # a rank gets here only after opening the others' buffers
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


def _builders(names: tuple[str, ...]) -> list:
    import deepspeed

    accelerator = deepspeed.get_accelerator()
    return [b for b in map(accelerator.create_op_builder, names) if b is not None and b.is_compatible(verbose=False)]


def _build_directory(op) -> Path:
    from torch.utils.cpp_extension import _get_build_directory  # the very function PyTorch's loader uses

    return Path(_get_build_directory(op.name, verbose=False))
