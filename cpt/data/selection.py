"""Which documents are held out: chosen by a seeded hash of each document's text, in one pass.

Each document gets a key: a 64-bit hash of its text, mixed with the seed. With ``heldout`` a
count k, the k documents with the smallest keys are held out, exactly k whatever order the
documents are read in and however many processes read them; with a fraction p, every document
whose key is below p * 2**64 is (about p of them), and at least the smallest. The same text twice
has one key: the earlier document comes first. The keys of a whole corpus never need to be in
memory together: the k smallest of each share contain the k smallest of all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cpt.config.data import DomainConfig
from cpt.errors import CptError

KEY = np.dtype("<u8")
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def text_hash(text: str) -> int:
    """The unseeded hash of a document's text (stored with its tokens, so that any seed can select)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def seeded_keys(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Keys of documents under ``seed``: their hashes through splitmix64's finalizer, so that each
    seed orders the documents independently."""
    word = np.uint64(text_hash(f"cpt-heldout-seed-{seed}"))
    x = np.asarray(hashes, dtype=KEY) ^ word
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX[0]
        x = (x ^ (x >> np.uint64(27))) * _MIX[1]
    return x ^ (x >> np.uint64(31))


def rule(heldout: float) -> tuple[int, int]:
    """(threshold, k): held out are the keys below ``threshold`` and the ``k`` smallest."""
    if heldout >= 1:
        return 0, int(heldout)
    if heldout == 0:
        return 0, 0
    return int(heldout * 2.0**64), 1


@dataclass(frozen=True)
class Cut:
    """A document (key, position) is held out when its key is below ``threshold``, or when it is
    no later than the k-th smallest (``key``, ``position``); ``n_held`` of ``n`` are."""

    threshold: int
    key: int | None
    position: int
    n: int
    n_held: int

    def held(self, keys: np.ndarray, first: int) -> np.ndarray:
        """Which of ``keys`` (of the documents at positions ``first``, ``first + 1``, ...) are held out."""
        keys = np.asarray(keys, dtype=KEY)
        held = keys < np.uint64(min(self.threshold, 2**64 - 1)) if self.threshold else np.zeros(len(keys), bool)
        if self.key is not None:
            positions = np.arange(first, first + len(keys))
            cut = np.uint64(self.key)
            held |= (keys < cut) | ((keys == cut) & (positions <= self.position))
        return held


def find_cut(chunks: Iterable[np.ndarray], heldout: float) -> Cut:
    """The cut of documents whose keys come in ``chunks``, in document order: one pass, holding
    at most k keys besides one chunk."""
    threshold, k = rule(heldout)
    best_keys = np.empty(0, dtype=KEY)
    best_positions = np.empty(0, dtype=np.int64)
    n = below = 0
    for keys in chunks:
        keys = np.asarray(keys, dtype=KEY)
        if threshold:
            below += int((keys < np.uint64(min(threshold, 2**64 - 1))).sum())
        if k:
            all_keys = np.concatenate([best_keys, keys])
            all_positions = np.concatenate([best_positions, np.arange(n, n + len(keys))])
            order = np.lexsort((all_positions, all_keys))[:k]
            best_keys, best_positions = all_keys[order], all_positions[order]
        n += len(keys)
    if len(best_keys) == 0:
        return Cut(threshold, None, -1, n, below)
    return Cut(threshold, int(best_keys[-1]), int(best_positions[-1]), n, max(below, len(best_keys)))


def check_size(cfg: DomainConfig, cut: Cut) -> None:
    if cut.n - cut.n_held < 1:
        raise too_small(cfg, cut.n, cut.n_held)


def too_small(cfg: DomainConfig, n: int, held: int) -> CptError:
    return CptError(
        f"{cfg.source} has {n} non-empty document(s); the held-out split takes {held} "
        "and training needs at least one more: lower heldout or add documents",
        where="heldout",
    )


def heldout_size(heldout: float, n_documents: int) -> int:
    """About how many of ``n_documents`` are held out: exactly for a count, the expectation
    (at least one) for a fraction. For checks that must not read the whole corpus."""
    if heldout >= 1:
        return int(heldout)
    if heldout == 0:
        return 0
    return max(1, round(heldout * n_documents))
