"""Pure functions on logged series: smoothing and the realized mixture."""

from __future__ import annotations

import numpy as np


def smoothing_window(n: int) -> int:
    """About a twentieth of the points, at most 50: smooth enough to read, short enough to follow trends."""
    return max(1, min(50, n // 20))


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling mean that skips non-finite values (a "nan" batch does not blank its neighbours)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v.copy()
    finite = np.isfinite(v)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    start = np.clip(np.arange(v.size) - window // 2, 0, v.size)
    stop = np.clip(start + window, 0, v.size)
    n = counts[stop] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[stop] - sums[start]) / np.maximum(n, 1), np.nan)


def mixture_shares(cumulative: np.ndarray) -> np.ndarray:
    """Share of each domain in the tokens consumed since the previous record.

    ``cumulative`` is (records, domains) of cumulative tokens within one stage, which starts at 0;
    NaN means the record did not mention the domain (no new tokens). A record with no new tokens
    at all gets NaN shares.
    """
    c = np.array(cumulative, dtype=float, ndmin=2)
    for j in range(c.shape[1]):  # carry the last known count forward; before the first one it is 0
        column = c[:, j]
        known = np.isfinite(column)
        last = np.maximum.accumulate(np.where(known, np.arange(len(column)), -1))
        c[:, j] = np.where(last >= 0, column[np.maximum(last, 0)], 0.0)
    increments = np.diff(c, axis=0, prepend=0.0)
    total = increments.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, increments / np.where(total > 0, total, 1.0), np.nan)
