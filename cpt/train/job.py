"""Starting a training job (a run or an anneal branch) in its directory, in one or many processes.

The first process locks the job directory for the job's whole life (:mod:`cpt.lock`), claims it
(:func:`cpt.io.claim_dir`) and prepares the data once; then it trains itself or starts the
processes the recipe asks for under DeepSpeed's launcher, which find everything ready. Processes
started by an outside launcher (torchrun, accelerate) do the same with rank 0 in charge. Then
every process reads the prepared data in turn (:func:`prepare_in_turn`), so that no two processes
ever race to write one cache, whether the nodes share it or each has its own.
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
        return work(prepare_in_turn(prepare))


def prepare_in_turn(prepare: Callable[[], T]) -> T:
    """``prepare`` on every rank, never by two processes of one cache at once: rank 0 first, then
    the first process of every other node, then the rest. With one cache that all nodes share the
    later ones only read what rank 0 wrote; with a cache on each node's local disk, the first
    process of each node fills its node's cache and the node's other processes read it."""
    ctx = distributed_context()
    turn = 0 if ctx.is_main else 1 if ctx.local_rank == 0 else 2
    prepared = None
    for phase in range(3):
        if phase == turn:
            prepared = prepare()
        dist.barrier()
    return prepared
