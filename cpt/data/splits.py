"""The held-out split of a domain: which documents of its fixed order are held out, never trained on.

A seeded, exact-size random subset picked in a single streaming pass by selection sampling
(Knuth's Algorithm S), so neither split is ever held in memory and the two are disjoint by
construction. Streaming hub datasets have no known size: their first N documents are held out.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from itertools import islice
from typing import Literal, TypeVar

from cpt.config.data import DomainConfig
from cpt.errors import CptError

Split = Literal["train", "heldout"]
T = TypeVar("T")  # a document, with whatever its reader carries along


def heldout_size(heldout: float, n_documents: int) -> int:
    """Documents held out of ``n_documents``: a count, or a rounded fraction of at least one."""
    if heldout >= 1:
        return int(heldout)
    if heldout == 0:
        return 0
    return max(1, round(heldout * n_documents))


def sampled_split(cfg: DomainConfig, documents: Iterator[T], n: int, split: Split, seed: int) -> Iterator[T]:
    """One split of the ``n`` documents of a source; the same (seed, source) always gives the same split."""
    k = heldout_size(cfg.heldout, n)
    if n - k < 1:
        raise too_small(cfg, n)
    rng = random.Random(hashlib.sha256(f"{seed}\0{cfg.source}".encode()).digest())
    wanted = split == "heldout"
    chosen = (doc for doc, held in zip(documents, _selection(n, k, rng)) if held == wanted)
    return islice(chosen, k if wanted else cfg.max_documents)


def streamed_split(cfg: DomainConfig, documents: Iterator[T], split: Split) -> Iterator[T]:
    """One split of a stream of unknown size: the first ``heldout`` documents are held out."""
    k = int(cfg.heldout)
    if split == "heldout":
        return islice(documents, k)
    return islice(documents, k, None if cfg.max_documents is None else k + cfg.max_documents)


def too_small(cfg: DomainConfig, n: int) -> CptError:
    return CptError(
        f"{cfg.source} has {n} non-empty document(s); the held-out split takes {heldout_size(cfg.heldout, n)} "
        "and training needs at least one more: lower heldout or add documents",
        where="heldout",
    )


def _selection(n: int, k: int, rng: random.Random) -> Iterator[bool]:
    """Algorithm S: True for exactly k of n positions, each k-subset equally likely."""
    for i in range(n):
        take = rng.random() * (n - i) < k
        k -= take
        yield take
