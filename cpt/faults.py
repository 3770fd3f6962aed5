"""Deterministic fault injection for the crash tests: ``CPT_FAULT=<point>[@<n>]:<kill|enospc>``.

The checkpoint and file-writing code names its phases (``checkpoint.engine``, ``checkpoint.rng``,
``checkpoint.marker`` (before it is written), ``checkpoint.rename``, ``checkpoint.renamed``, ``io.write``, ``metrics.write``); when the variable names a phase the
process dies there with SIGKILL (as a node failure would) or sees ENOSPC (as on a full disk),
at the n-th time it passes the phase (default 1). Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from pathlib import Path

ENV = "CPT_FAULT"
_passes: Counter[str] = Counter()


def point(name: str, path: Path | str = "") -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, action = spec.partition(":")
    target, _, nth = where.partition("@")
    if target != name:
        return
    _passes[name] += 1
    if _passes[name] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    else:
        raise ValueError(f"{ENV}={spec}: the action must be kill or enospc")
