"""A split's token stream as pieces of its units' files, read as fixed-length blocks.

A split is a list of pieces ``(unit, start, end)``: element ranges of the units' files, in
order. Nothing is copied to assemble it, so stitching shards that several machines prepared
costs an index, and any block length reads the same stream. Files are memory-mapped when first
read; at most ``OPEN_FILES`` stay mapped, since a large corpus has more units than a process may
keep open.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

OPEN_FILES = 64


class Stream:
    """Elements ``[0, len)`` of the concatenated pieces of ``files`` (one file per unit)."""

    def __init__(self, files: Sequence[Path], pieces: np.ndarray, dtype: np.dtype | str):
        self.files = list(files)
        self.pieces = np.asarray(pieces, dtype=np.int64).reshape(-1, 3)
        self.dtype = np.dtype(dtype)
        self.bounds = np.concatenate([[0], np.cumsum(self.pieces[:, 2] - self.pieces[:, 1])]).astype(np.int64)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and the main thread read at once

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, end: int) -> np.ndarray:
        """Elements ``[start, end)`` as a new array."""
        out = np.empty(end - start, dtype=self.dtype)
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        done = 0
        while start + done < end:
            unit, first, last = (int(x) for x in self.pieces[i])
            offset = start + done - int(self.bounds[i])
            take = min(last - first - offset, end - start - done)
            out[done : done + take] = self._map(unit)[first + offset : first + offset + take]
            done += take
            i += 1
        return out

    def _map(self, unit: int) -> np.memmap:
        with self._lock:
            found = self._maps.pop(unit, None)
            if found is None:
                found = np.memmap(self.files[unit], dtype=self.dtype, mode="r")
                if len(self._maps) >= OPEN_FILES:
                    self._maps.popitem(last=False)
            self._maps[unit] = found
            return found


class Blocks:
    """Blocks ``[first, first + n)`` of ``seq_len`` elements of a stream: indexing gives arrays."""

    def __init__(self, stream: Stream, seq_len: int, n: int, first: int = 0):
        self.stream, self.seq_len, self.n, self.first = stream, seq_len, n, first

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.seq_len

    @property
    def dtype(self) -> np.dtype:
        return self.stream.dtype

    def __getitem__(self, key):
        """An int: one block; a slice of step 1: a narrower view; an array of indices: their blocks."""
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.n)
            return Blocks(self.stream, self.seq_len, max(stop - start, 0), self.first + start)
        if isinstance(key, (int, np.integer)):
            return self._rows(np.array([key]))[0]
        return self._rows(np.arange(self.n)[key] if isinstance(key, slice) else np.asarray(key))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.stream.read(self.first * self.seq_len, (self.first + self.n) * self.seq_len).reshape(self.shape)
        return whole if dtype is None else whole.astype(dtype)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.where(rows < 0, rows + self.n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"block index out of range for {self.n} blocks")
        out = np.empty((len(rows), self.seq_len), dtype=self.dtype)
        for i, row in enumerate(rows):
            start = (self.first + int(row)) * self.seq_len
            out[i] = self.stream.read(start, start + self.seq_len)
        return out
