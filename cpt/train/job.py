"""Starting a training job (a run or an anneal branch) in its directory, in one or many processes.

The first process locks the job directory for the job's whole life (:mod:`cpt.lock`), claims it
(:func:`cpt.io.claim_dir`) and prepares the data once; then it trains itself or starts the
processes the recipe asks for under DeepSpeed's launcher, which find everything ready. Processes
started by an outside launcher (torchrun, accelerate) do the same with rank 0 in charge; rank 0
prepares the data first, so that the others read its cache instead of racing to write it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from cpt import dist
from cpt.config.training import DistributedConfig
from cpt.errors import CptError
from cpt.lock import hold
from cpt.train.engine import current_device, init_distributed
from cpt.train.launch import distributed_context, needs_launch, relaunch_under_deepspeed

PREPARED_ENV = "CPT_RUN_PREPARED"  # set by the parent for processes it launches: the directory is ready

T = TypeVar("T")


def start_job(
    out_dir: Path, distributed: DistributedConfig, argv: list[str], *, claim: Callable[[], None],
    prepare: Callable[[], T], work: Callable[[T], int],
) -> int:
    """Lock and ``claim`` ``out_dir``, ``prepare`` the data, then ``work`` here or in launched processes."""
    ctx = distributed_context()
    if not ctx.launched:
        with hold(out_dir):
            claim()
            prepared = prepare()
            if needs_launch(distributed):
                os.environ[PREPARED_ENV] = "1"
                return relaunch_under_deepspeed(argv, distributed)
            return work(prepared)
    init_distributed()
    with ExitStack() as held:
        if os.environ.get(PREPARED_ENV) != "1":  # an outside launcher: rank 0 locks and claims the directory
            problem = None
            if ctx.is_main:
                try:
                    held.enter_context(hold(out_dir))
                    claim()
                except CptError as exc:
                    problem = exc
            problem = dist.broadcast_object(problem, current_device())
            if problem is not None:
                raise problem
        if not ctx.is_main:
            dist.barrier()  # rank 0 fills the data cache first
        prepared = prepare()
        if ctx.is_main:
            dist.barrier()
        return work(prepared)
