"""DeepSpeed's just-in-time built ops (CPU Adam, CPU shared-memory collectives), loaded so that a
process killed while loading one cannot leave every later run waiting.

PyTorch builds and loads such an op under a lock *file* in the op's build directory, created on
every load (even when nothing needs building) and removed afterwards; a process killed in between
(``kill -9``, a job's time limit, an out-of-memory kill) leaves the file behind, and every later
load on that machine sleeps forever waiting for it to go. cpt loads ops while holding an OS file
lock of its own, which the kernel releases when its holder dies: whoever holds it knows that a
PyTorch lock file still present belongs to a dead process, and removes it. The ops it loads stay
in DeepSpeed's per-process cache, so DeepSpeed's own later loads never touch the lock file again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock

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


def _builders(names: tuple[str, ...]) -> list:
    import deepspeed

    accelerator = deepspeed.get_accelerator()
    return [b for b in map(accelerator.create_op_builder, names) if b is not None and b.is_compatible(verbose=False)]


def _build_directory(op) -> Path:
    from torch.utils.cpp_extension import _get_build_directory  # the very function PyTorch's loader uses

    return Path(_get_build_directory(op.name, verbose=False))
