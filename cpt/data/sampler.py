"""Deterministic, exactly-on-schedule and resumable interleaving of domain blocks.

Which domain fills each batch slot: the slots of a stage (``batch_blocks`` per step) are
assigned one by one with Tijdeman's algorithm for the chairman assignment problem
(R. Tijdeman, Discrete Mathematics 32, 1980). Domain d's target after slot n is the running sum
of its per-slot weights, Lambda_d(n); with delta = 1/(2D - 2) for D domains that have weight,
a slot goes to the domain, among those with Lambda_d(n) - count_d >= delta, whose deadline (the
first slot m with Lambda_d(m) >= count_d + 1 - delta) comes first, ties to the lowest index.
This keeps |count_d - Lambda_d| <= 1 - delta < 1 at every slot for any weight sequence, abrupt
phase changes included, which independent draws or per-step rounding cannot promise.

Release and deadline of a domain's next draw depend only on its count, so the whole state is
(step, counts): restoring it is O(D) and never replays earlier steps.

Which block: domain d's c-th draw of the stage is block perm_e(c mod n_d) with epoch
e = c // n_d, where perm_e is a keyed pseudo-random permutation of range(n_d): an alternating
Feistel network on Z_a x Z_b with a * b just above n_d, cycle-walked into range. It is computed
per index, so memory stays flat however large the corpus, and every epoch visits every block once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import numpy as np

_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_HIGH = np.uint64(32)


def _domain_keys(seed: int, key: str, domain: int) -> np.ndarray:
    """Per Feistel round an additive key and an odd multiplier, shape (2 * rounds,)."""
    digest = hashlib.shake_256(f"{seed}\x1f{key}\x1f{domain}".encode()).digest(16 * _ROUNDS)
    keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
    keys[1::2] |= np.uint64(1)
    return keys


def _radices(n: int) -> tuple[int, int]:
    """Two radices a >= b with a * b >= n and a * b - n < a: a near-square Feistel domain."""
    a = math.isqrt(n - 1) + 1
    return a, -(-n // a)


def _feistel(x, a, b, adds, muls):
    """A keyed bijection of [0, a*b): an alternating Feistel network on Z_a x Z_b."""
    left, right = x // b, x % b
    for add, mul in zip(adds, muls):
        mixed = (right + add) * mul
        mixed = ((mixed ^ (mixed >> _HIGH)) * _MIX) >> _HIGH
        left, right = right, (left + mixed) % a
        a, b = b, a
    return left * b + right


def _permute(positions: np.ndarray, n, a, b, keys: np.ndarray, epochs) -> np.ndarray:
    """Keyed bijections of [0, n), element-wise: uint64 arrays (or scalars) that broadcast together.

    ``keys`` (2 * rounds, ...) are the domain's round keys; the epoch shifts every additive key,
    which gives each epoch its own permutation.
    """
    adds, muls = keys[0::2] + epochs * _GOLDEN, keys[1::2]
    out = _feistel(positions, a, b, adds, muls)
    outside = out >= n
    while outside.any():  # cycle walking back into [0, n); rare since a*b - n < a
        out = np.where(outside, _feistel(out, a, b, adds, muls), out)
        outside = out >= n
    return out


def shuffled_index(positions, n: int, seed: int, key: str, domain: int, epoch: int) -> np.ndarray:
    """Block at each position of one epoch of a domain with ``n`` blocks (a bijection of range(n))."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    keys = _domain_keys(seed, key, domain)[:, None]
    a, b = (np.uint64(r) for r in _radices(n))
    out = _permute(pos.ravel().astype(np.uint64), np.uint64(n), a, b, keys, np.array([epoch], dtype=np.uint64))
    return out.astype(np.int64).reshape(pos.shape)


class MixtureSampler:
    """Batches of (domain index, block index) that follow a weight schedule to within one block.

    ``weights`` (steps, D) gives each step's domain shares (rows sum to 1); ``domain_blocks`` the
    training blocks per domain; ``batch_blocks`` the global batch in blocks. Rank ``rank`` of
    ``world_size`` gets the contiguous slice ``[rank * b, (rank + 1) * b)`` of every global batch,
    b = batch_blocks // world_size, so the global stream does not depend on the world size.
    """

    def __init__(
        self,
        weights: np.ndarray,
        domain_blocks: Sequence[int],
        batch_blocks: int,
        seed: int,
        key: str,
        rank: int = 0,
        world_size: int = 1,
        offsets: Sequence[int] | None = None,
    ):
        W = np.asarray(weights, dtype=np.float64)
        if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
            raise ValueError(f"weights must have shape (steps >= 1, domains >= 1), got {W.shape}")
        if not np.isfinite(W).all() or (W < 0).any():
            raise ValueError("weights must be finite and >= 0")
        if not np.allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-6):
            raise ValueError("every row of weights must sum to 1")
        steps, n_domains = W.shape
        blocks = [int(n) for n in domain_blocks]
        if len(blocks) != n_domains:
            raise ValueError(f"domain_blocks has {len(blocks)} entries for {n_domains} domains")
        if batch_blocks < 1 or world_size < 1 or batch_blocks % world_size:
            raise ValueError(f"batch_blocks ({batch_blocks}) must be a positive multiple of world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self._W = W / W.sum(axis=1, keepdims=True)
        self._active = np.flatnonzero(self._W.sum(axis=0) > 0).tolist()
        empty = [d for d in self._active if blocks[d] < 1]
        if empty:
            raise ValueError(f"domains {empty} have weight but no blocks")

        self._steps, self._batch = steps, batch_blocks
        self._lo = rank * (batch_blocks // world_size)
        self._hi = self._lo + batch_blocks // world_size
        # Draws already taken from each domain before this schedule (a branch forked from a run
        # continues that run's data order instead of repeating it).
        self._offsets = np.array(offsets if offsets is not None else [0] * n_domains, dtype=np.uint64)
        if self._offsets.shape != (n_domains,):
            raise ValueError(f"offsets has {len(self._offsets)} entries for {n_domains} domains")
        self._keys = np.stack([_domain_keys(seed, key, d) for d in range(n_domains)], axis=1)
        self._n = np.array([max(n, 1) for n in blocks], dtype=np.uint64)
        self._a, self._b = np.array([_radices(max(n, 1)) for n in blocks], dtype=np.uint64).T
        # Cumulative targets at step boundaries, one contiguous row per domain for searchsorted.
        self._cum = np.zeros((n_domains, steps + 1))
        self._cum[:, 1:] = np.cumsum(batch_blocks * self._W, axis=0).T
        # A draw is released when the target leads the count by delta and due before it leads by
        # 1 - delta; eps (far below delta) keeps those inclusive comparisons robust to rounding.
        delta = 1 / (2 * len(self._active) - 2) if len(self._active) > 1 else 0.5
        eps = 1e-9 + 1e-12 * batch_blocks * steps
        self._lead, self._lag = delta - eps, 1 - delta - eps
        self._never = steps * batch_blocks + 1
        self._restore(0, [0] * n_domains)

    @property
    def step(self) -> int:
        """The next step to be produced (0-based)."""
        return self._step

    @property
    def steps(self) -> int:
        """Steps in the schedule."""
        return self._steps

    def realized_blocks(self) -> np.ndarray:
        """Blocks drawn so far per domain, over the global batch."""
        return np.array(self._counts, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"step": self._step, "counts": list(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        step, counts = int(state["step"]), [int(c) for c in state["counts"]]
        if len(counts) != len(self._counts) or not 0 <= step <= self._steps:
            raise ValueError(f"sampler state (step {step}, {len(counts)} domains) does not fit this schedule")
        if (np.abs(np.array(counts) - self._cum[:, step]) >= 1).any():
            raise ValueError(f"sampler state counts {counts} are off this schedule's targets at step {step}")
        self._restore(step, counts)

    def __iter__(self) -> Iterator[np.ndarray]:
        while self._step < self._steps:
            yield self.next_step()

    def next_step(self) -> np.ndarray:
        """This rank's (domain, block) rows of the current step, shape (batch_blocks // world_size, 2)."""
        if self._step >= self._steps:
            raise RuntimeError(f"the schedule has only {self._steps} steps")
        domains, draws = self._assign()
        self._step += 1
        self._load_rows()
        dom = np.array(domains[self._lo : self._hi], dtype=np.int64)
        drawn = np.array(draws[self._lo : self._hi], dtype=np.uint64) + self._offsets[dom]
        n = self._n[dom]
        block = _permute(drawn % n, n, self._a[dom], self._b[dom], self._keys[:, dom], drawn // n)
        return np.stack([dom, block.astype(np.int64)], axis=1)

    def _assign(self) -> tuple[list[int], list[int]]:
        """Domain and per-domain draw number of every slot of the current global batch."""
        counts, batch = self._counts, self._batch
        if len(self._active) == 1:
            (d,) = self._active
            first = counts[d]
            counts[d] += batch
            return [d] * batch, list(range(first, first + batch))
        release, deadline, active = self._release, self._deadline, self._active
        domains, draws = [0] * batch, [0] * batch
        base = self._step * batch
        for j in range(batch):
            slot = base + j + 1
            best, due = -1, self._never + 1
            for d in active:
                if release[d] <= slot and deadline[d] < due:
                    best, due = d, deadline[d]
            if best < 0:
                raise RuntimeError(f"no domain is due at slot {slot}: weights rows must sum to 1")
            domains[j], draws[j] = best, counts[best]
            counts[best] += 1
            self._next_draw(best)
        return domains, draws

    def _next_draw(self, d: int) -> None:
        """Release and deadline slots of domain d's next draw: functions of its count alone."""
        self._release[d] = self._reach(d, self._counts[d] + self._lead)
        self._deadline[d] = self._reach(d, self._counts[d] + self._lag)

    def _reach(self, d: int, level: float) -> int:
        """First slot (1-based, global) at which domain d's cumulative target reaches ``level``."""
        if self._start[d] < level <= self._end[d]:  # within the current step: the common case
            j = math.ceil((level - self._start[d]) / self._w[d])
            return self._first_slot + (j if j < self._batch else self._batch)
        i = int(self._cum[d].searchsorted(level))
        if i > self._steps:
            return self._never
        j = math.ceil((level - float(self._cum[d, i - 1])) / float(self._W[i - 1, d]))
        return (i - 1) * self._batch + (j if j < self._batch else self._batch)

    def _load_rows(self) -> None:
        """Cache the current step's start/end targets and weights as Python floats (fast path)."""
        step = min(self._step, self._steps - 1)
        self._start = self._cum[:, step].tolist()
        self._end = self._cum[:, step + 1].tolist()
        self._w = self._W[step].tolist()
        self._first_slot = step * self._batch

    def _restore(self, step: int, counts: list[int]) -> None:
        self._step, self._counts = step, list(counts)
        self._load_rows()
        n_domains = len(counts)
        self._release = [self._never] * n_domains
        self._deadline = [self._never] * n_domains
        for d in self._active:
            self._next_draw(d)
