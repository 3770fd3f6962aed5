"""Raw text documents of one data domain, whatever their source: the one entry point for readers.

Every source yields its non-empty documents in one fixed order; :mod:`cpt.data.splits` cuts the
held-out split from it. The readers are :mod:`cpt.data.builtin`, :mod:`cpt.data.files` and
:mod:`cpt.data.hub`; the schema is :mod:`cpt.config.data`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cpt.config.data import DomainConfig, source_kind
from cpt.data import builtin, files, hub
from cpt.data.splits import (
    Split,
    heldout_size,
    sampled_split,
    streamed_split,
    too_small,
)


def check_domain(cfg: DomainConfig) -> None:
    """Fail early on problems a run would otherwise hit later; never contacts the hub.

    Counting stops as soon as the domain is known to be large enough: the number of training
    documents, n - heldout_size(n), never decreases as n grows.
    """
    kind = source_kind(cfg.source)
    if kind == "hf":
        return
    if kind == "local":
        for path in files.local_files(cfg.source):
            files.check_file(path, cfg.text_field)
    n = 0
    for _ in _all_documents(cfg):
        n += 1
        if n - heldout_size(cfg.heldout, n) >= 1:
            return
    raise too_small(cfg, n)


def iter_documents(cfg: DomainConfig, split: Split, seed: int) -> Iterator[str]:
    """Stream the documents of one split; the same (seed, source) always gives the same split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    documents = _all_documents(cfg)
    if cfg.hf is not None and cfg.hf.streaming:
        return streamed_split(cfg, documents, split)
    return sampled_split(cfg, documents, _count_documents(cfg), split, seed)


def fingerprint(cfg: DomainConfig, seed: int) -> str:
    """A short hash that changes whenever the documents of the domain's splits may change."""
    parts: dict[str, Any] = cfg.model_dump(exclude={"max_epochs"}) | {"seed": seed}
    kind = source_kind(cfg.source)
    if kind == "builtin":
        parts["python"] = builtin.installation()
    elif kind == "local":
        parts["files"] = [files.file_stamp(path) for path in files.local_files(cfg.source)]
    elif cfg.hf is not None and cfg.hf.data_files is not None:
        parts["files"] = [files.file_stamp(Path(p)) for p in hub.local_data_files(cfg.hf.data_files)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


_counts: dict[str, int] = {}  # documents per source, keyed by fingerprint: both splits need it


def _count_documents(cfg: DomainConfig) -> int:
    key = fingerprint(cfg, seed=0)
    if key not in _counts:
        _counts[key] = sum(1 for _ in _all_documents(cfg))
    return _counts[key]


def _all_documents(cfg: DomainConfig) -> Iterator[str]:
    kind = source_kind(cfg.source)
    if kind == "builtin":
        texts = builtin.CORPORA[cfg.source.removeprefix("builtin:")]()
    elif kind == "hf":
        texts = hub.hf_texts(cfg)
    else:
        texts = (text for path in files.local_files(cfg.source) for text in files.file_texts(path, cfg.text_field))
    return (text for text in texts if text.strip())
