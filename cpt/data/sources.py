"""Raw text documents of one data domain, whatever their source: the one entry point for readers.

Every source yields its non-empty documents in one fixed order; :mod:`cpt.data.splits` cuts the
held-out split from it. A domain with ``metadata`` gives each document a prefix too
(:func:`iter_tagged`), from values its reader reads along with the text, and only those. The
readers are :mod:`cpt.data.builtin`, :mod:`cpt.data.files` and :mod:`cpt.data.hub`; the schema
is :mod:`cpt.config.data`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cpt.config.data import DomainConfig, MetadataConfig, metadata_problem, source_kind
from cpt.data import builtin, files, hub
from cpt.data.files import Document
from cpt.data.splits import (
    Split,
    heldout_size,
    sampled_split,
    streamed_split,
    too_small,
)
from cpt.errors import CptError

_NO_VALUES: Mapping[str, str] = MappingProxyType({})  # shared by the documents whose prefix reads nothing


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
            files.check_file(path, [cfg.text_field, *_row_fields(cfg.metadata)])
            _check_fits(cfg.metadata, path)
    n = 0
    for _ in _documents(cfg, cfg.metadata):
        n += 1
        if n - heldout_size(cfg.heldout, n) >= 1:
            return
    raise too_small(cfg, n)


def iter_documents(cfg: DomainConfig, split: Split, seed: int) -> Iterator[str]:
    """Stream the documents of one split; the same (seed, source) always gives the same split.

    The texts alone: ``metadata`` is not read, so it cannot fail here.
    """
    return (text for text, _ in _split(cfg, None, split, seed))


def iter_tagged(cfg: DomainConfig, split: Split, seed: int) -> Iterator[tuple[str, str]]:
    """The documents of :func:`iter_documents`, in its order, as (metadata prefix, text); "" without metadata."""
    meta = cfg.metadata
    if meta is None:
        return (("", text) for text, _ in _split(cfg, None, split, seed))
    return ((_prefix(meta, values), text) for text, values in _split(cfg, meta, split, seed))


def _prefix(meta: MetadataConfig, values: Mapping[str, str]) -> str:
    """A document's prefix from the values read with it: its row's fields, or its own name under "value"."""
    if meta.value is not None:
        value: str | None = meta.value
    else:
        value = values.get(meta.field or "value")  # None: the template names row fields only
    names = dict(values) if value is None else {**values, "value": value, "host": url_host(value)}
    return meta.template.format_map(names)


def url_host(value: str) -> str:
    """The host of a URL with a network location, lowercased, without user or port; any other value is its own.

    Only what urllib reads as a URL counts: a scheme-less ``www.example.com/x`` has no network location
    and stays whole, as guessing would also cut file paths such as ``json/decoder.py``.
    """
    try:
        return urlsplit(value).hostname or value
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return value


def fingerprint(cfg: DomainConfig, seed: int) -> str:
    """A short hash that changes whenever the documents of the domain's splits may change.

    ``metadata`` changes only the prefixes (:func:`metadata_fingerprint`), so caches of the texts stay valid.
    """
    parts: dict[str, Any] = cfg.model_dump(exclude={"max_epochs", "metadata"}) | {"seed": seed}
    kind = source_kind(cfg.source)
    if kind == "builtin":
        parts["python"] = builtin.installation()
    elif kind == "local":
        parts["files"] = [files.file_stamp(path) for path in files.local_files(cfg.source)]
    elif cfg.hf is not None and cfg.hf.data_files is not None:
        parts["files"] = [files.file_stamp(Path(p)) for p in hub.local_data_files(cfg.hf.data_files)]
    return _digest(parts)


def metadata_fingerprint(cfg: DomainConfig) -> str | None:
    """A short hash of what the prefixes depend on besides the documents; None without metadata."""
    return None if cfg.metadata is None else _digest(cfg.metadata.model_dump())


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


_counts: dict[str, int] = {}  # documents per source, keyed by fingerprint: both splits need it


def _count_documents(cfg: DomainConfig) -> int:
    key = fingerprint(cfg, seed=0)
    if key not in _counts:
        _counts[key] = sum(1 for _ in _documents(cfg, None))
    return _counts[key]


def _split(cfg: DomainConfig, meta: MetadataConfig | None, split: Split, seed: int) -> Iterator[Document]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    documents = _documents(cfg, meta)
    if cfg.hf is not None and cfg.hf.streaming:
        return streamed_split(cfg, documents, split)
    return sampled_split(cfg, documents, _count_documents(cfg), split, seed)


def _documents(cfg: DomainConfig, meta: MetadataConfig | None) -> Iterator[Document]:
    """Every non-empty document in the source's order, with the values ``meta``'s prefix reads (none without it)."""
    kind = source_kind(cfg.source)
    if kind == "builtin":
        documents = _named(meta, builtin.CORPORA[cfg.source.removeprefix("builtin:")]())
    elif kind == "hf":
        documents = hub.hf_documents(cfg, _row_fields(meta))
    else:
        root = files.glob_root(cfg.source)
        paths = files.local_files(cfg.source)
        documents = (document for path in paths for document in _file_documents(cfg, meta, path, root))
    return (document for document in documents if document[0].strip())


def _file_documents(cfg: DomainConfig, meta: MetadataConfig | None, path: Path, root: Path) -> Iterator[Document]:
    _check_fits(meta, path)
    documents = files.file_documents(path, cfg.text_field, _row_fields(meta))
    if files.file_format(path) != "text":
        return documents
    name = path.relative_to(root).as_posix()
    return _named(meta, ((text, name) for text, _ in documents))


def _named(meta: MetadataConfig | None, documents: Iterable[tuple[str, str]]) -> Iterator[Document]:
    """Documents whose metadata value, when they need one of their own, is their name."""
    if meta is None or not meta.natural:
        return ((text, _NO_VALUES) for text, _ in documents)
    return ((text, {"value": name}) for text, name in documents)


def _row_fields(meta: MetadataConfig | None) -> tuple[str, ...]:
    return () if meta is None else meta.row_fields


def _check_fits(meta: MetadataConfig | None, path: Path) -> None:
    """Fail on a file whose documents ``meta`` cannot tag: a glob may match both text files and rows."""
    problem = meta is not None and metadata_problem(meta, rows=files.file_format(path) != "text")
    if problem:
        raise CptError(f"{path}: {problem}", where="metadata")
