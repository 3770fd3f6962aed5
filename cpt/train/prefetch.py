"""The next step's batch, gathered in a background thread while the current step trains.

Drawing a step's rows from the sampler and reading them from the memory-mapped blocks happens on
the host; done in the training thread it leaves the accelerator idle meanwhile. Here a thread
prepares one step ahead into page-locked (pinned) memory on a GPU, so that the copy to the device
can be asynchronous (``non_blocking=True``). numpy's copies and torch's pinning release the GIL.

The sampler runs ahead of training, so its own state is not the run's: :meth:`state_dict` and
:meth:`realized_blocks` describe the steps handed out so far, which is what a checkpoint saves and
a resumed run restores. A resumed run therefore sees the same batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cpt.data.blocks import TokenBatch
from cpt.data.sampler import MixtureSampler


@dataclass
class Batch:
    """One step's token rows and the domain of each row, on the host (pinned on a GPU)."""

    tokens: TokenBatch
    domains: torch.Tensor  # (rows,) int64
    state: dict  # the sampler's state once this step is drawn
    realized: np.ndarray  # blocks drawn per domain, this step included


class Prefetcher:
    """Hands out the sampler's steps up to ``steps`` (exclusive), one being prepared ahead;
    ``read(step, rows)`` reads the sampler's (domain, block) rows of a step."""

    def __init__(self, sampler: MixtureSampler, read: Callable[[int, np.ndarray], TokenBatch], steps: int, pin: bool):
        self._sampler, self._read, self._pin = sampler, read, pin
        self._state, self._realized = sampler.state_dict(), sampler.realized_blocks()
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(steps,), name="cpt-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, steps: int) -> None:
        try:
            while self._sampler.step < steps and not self._closed.is_set():
                step = self._sampler.step
                rows = self._sampler.next_step()
                tokens = self._read(step, rows)
                batch = Batch(tokens.pin_memory() if self._pin else tokens,
                              self._host(np.ascontiguousarray(rows[:, 0])),
                              self._sampler.state_dict(), self._sampler.realized_blocks())
                self._put(batch)
        except BaseException as exc:  # handed to the training thread, which raises it
            self._put(exc)

    def _host(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory() if self._pin else tensor

    def _put(self, item) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> Batch:
        """The next step's batch (waits for it if it is not ready yet)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._state, self._realized = item.state, item.realized
        return item

    def state_dict(self) -> dict:
        """The sampler state after the steps handed out so far."""
        return dict(self._state)

    def realized_blocks(self) -> np.ndarray:
        return self._realized

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
