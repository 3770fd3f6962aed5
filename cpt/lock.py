"""One live process per job directory (a run, an anneal branch, a sweep).

The lock is an OS file lock taken through ``filelock``: the kernel drops it when its holder dies,
so a lock left by a killed process is simply taken over, and there is no pid file to go stale.
Who holds it (pid and host) is written beside it, so a refused second process can say.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from cpt.errors import CptError
from cpt.io import io_errors, write_json
from cpt.paths import check_output_dir

LOCK = ".cpt.lock"
HOLDER = ".cpt.lock.json"
FILES = (LOCK, HOLDER)  # entries of a job directory that belong to the lock, not to the job


@contextmanager
def hold(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the block; CptError at once when a live process holds it."""
    directory = Path(directory)
    check_output_dir(directory)
    with io_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    # no soft (existence) lock as a fallback: a killed holder would leave it behind for good
    lock = FileLock(directory / LOCK, timeout=0, thread_local=False, fallback_to_soft=False, preserve_lock_file=True)
    try:
        lock.acquire()
    except Timeout:
        raise CptError(f"in use by {_holder(directory)}; wait for it to finish or stop it first", str(directory)) from None
    try:
        write_json(directory / HOLDER, {"pid": os.getpid(), "host": socket.gethostname()})
        yield
    finally:
        (directory / HOLDER).unlink(missing_ok=True)
        lock.release()


def _holder(directory: Path) -> str:
    try:
        info = json.loads((directory / HOLDER).read_text())
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
