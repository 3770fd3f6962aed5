"""Starting the processes of a distributed run through DeepSpeed's launcher.

``cpt run`` with ``distributed.num_processes: N > 1`` started as one plain process re-executes
itself as ``deepspeed --num_gpus N --no_local_rank --module cpt.cli <the same arguments>``; each of
the N processes finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment and joins the
process group. A run started by a launcher already (``deepspeed``, ``torchrun``,
``accelerate launch``) is not relaunched: its environment decides the world size. Without a GPU,
each of the N processes runs ``cores / N`` threads unless ``OMP_NUM_THREADS`` says otherwise.

Multi-node: set ``distributed.hostfile`` to a DeepSpeed hostfile (one ``<host> slots=<K>`` line
per node; the hosts reachable by passwordless ssh, with pdsh installed) and start ``cpt run`` on
the first host. Every host then runs ``num_processes`` processes, the same cpt installation and
working directory are expected on each, and the run directory must be on a filesystem that all
hosts share (checkpoints are renamed into place by rank 0). Set ``master_port`` when the
default port 29500 may be taken on the first host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from cpt.config.training import DistributedConfig
from cpt.train.engine import accelerator_env

DEFAULT_MASTER_PORT = 29500  # DeepSpeed's own default, for hosts other than this one


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a launched job (a lone process is rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    launched: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """Read the variables that deepspeed, torchrun and accelerate launch all set."""
    env = os.environ
    return DistributedContext(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        launched="WORLD_SIZE" in env,
    )


def needs_launch(dist: DistributedConfig) -> bool:
    """Whether this process must start the run's processes instead of training itself."""
    return (dist.num_processes > 1 or dist.hostfile is not None) and not distributed_context().launched


def launcher_command(argv: Sequence[str], dist: DistributedConfig, module: str = "cpt.cli") -> list[str]:
    """The deepspeed launcher command that runs ``python -m <module> <argv>`` in every process."""
    port = dist.master_port or (DEFAULT_MASTER_PORT if dist.hostfile else _free_port())
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(dist.num_processes)]
    if dist.hostfile:
        cmd += ["--hostfile", dist.hostfile]
    return cmd + ["--master_port", str(port), "--no_local_rank", "--module", module, *argv]


def relaunch_under_deepspeed(argv: Sequence[str], dist: DistributedConfig, *, module: str = "cpt.cli") -> int:
    """Run ``python -m <module> <argv>`` (``cpt <argv>``) under the deepspeed launcher; return its exit code.

    SIGINT and SIGTERM sent to this process are passed on to the training processes themselves
    (not to the launcher, which would kill them after 30 s), so they can finish their step and
    save before exiting; on several nodes the launcher gets them and stops the remote processes.
    The launched processes stay in this process's group, so a signal to the whole group (Ctrl-C,
    ``kill -9 -PGID``) reaches them directly as well: their handlers must tolerate a repeat.
    """
    env = accelerator_env(dict(os.environ))
    if env.get("DS_ACCELERATOR") == "cpu":
        # N processes each running as many threads as there are cores would oversubscribe them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // dist.num_processes)))
    proc = subprocess.Popen(launcher_command(argv, dist, module), env=env)

    def forward(signum, _frame):
        targets = [psutil.Process(proc.pid)] if dist.hostfile else _workers(proc.pid)
        for p in targets:
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _workers(runner_pid: int) -> list[psutil.Process]:
    """The training processes on this node: children of DeepSpeed's node launcher, the runner's child."""
    try:
        return [w for launcher in psutil.Process(runner_pid).children() for w in launcher.children()]
    except psutil.NoSuchProcess:
        return []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
