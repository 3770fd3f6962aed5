"""DeepSpeed's just-in-time built ops (CPU Adam, CPU shared-memory collectives), loaded so that a
process killed while loading one cannot leave every later run waiting.

PyTorch builds and loads such an op under a lock *file* in the op's build directory, created on
every load (even when nothing needs building) and removed afterwards; a process killed in between
(``kill -9``, a job's time limit, an out-of-memory kill) leaves the file behind, and every later
load on that machine sleeps forever waiting for it to go. cpt loads ops while holding an OS file
lock of its own, which the kernel releases when its holder dies: whoever holds it knows that a
PyTorch lock file still present belongs to a dead process, and removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

SHARED_MEMORY_COMM = "ShareMemCommBuilder"  # built by deepspeed.init_distributed on the CPU accelerator
CPU_ADAM = "CPUAdamBuilder"  # built by DeepSpeedCPUAdam (optimizer offload)


def op_directories(*builders: str) -> list[Path]:
    """Where PyTorch builds the ops of ``builders`` (class names of DeepSpeed op builders; those the
    accelerator lacks are skipped) for this Python and torch build: under TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions/py311_cpu, say."""
    import deepspeed
    from torch.utils.cpp_extension import _get_build_directory

    accelerator = deepspeed.get_accelerator()
    ops = [b for b in map(accelerator.create_op_builder, builders) if b is not None]
    return [Path(_get_build_directory(op.name, verbose=False)) for op in ops]


@contextmanager
def loading_ops(*builders: str) -> Iterator[None]:
    """Hold this machine's op-loading lock while DeepSpeed loads the ops of ``builders``, first
    removing the lock files that killed processes left in their build directories."""
    directories = op_directories(*builders)
    if not directories:
        yield
        return
    with FileLock(directories[0].parent / "cpt-ops.lock", thread_local=False):
        for directory in directories:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing %s, left by a process killed while it loaded DeepSpeed's %s op", stale,
                            directory.name)
                stale.unlink(missing_ok=True)
        yield
