"""Raw text documents of one data domain, whatever their source: the one entry point for readers.

Every source yields its non-empty documents in one fixed order (the first ``max_documents`` of
them), read unit by unit (:mod:`cpt.data.units`); :mod:`cpt.data.selection` chooses the held-out
ones. A domain with ``metadata`` gives each document a prefix too (:func:`iter_tagged`), from
values its reader reads along with the text, and only those. Preparation
(:mod:`cpt.data.parallel`) reads the units in parallel, once; the streams here serve tokenizer
training, task building and tests, and read a domain twice (keys, then documents).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from cpt.config.data import DomainConfig, MetadataConfig, source_kind
from cpt.data import builtin, files, hub
from cpt.data.files import Document
from cpt.data.selection import KEY, Cut, check_size, find_cut, heldout_size, seeded_keys, text_hash, too_small
from cpt.data.units import check_fits, plan_units, unit_documents

Split = Literal["train", "heldout"]


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
            check_fits(cfg.metadata, path)
    n = 0
    for _ in _documents(cfg, cfg.metadata):
        n += 1
        if n - heldout_size(cfg.heldout, n) >= 1:
            return
    raise too_small(cfg, n, heldout_size(cfg.heldout, n))


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
    return ((prefix(meta, values), text) for text, values in _split(cfg, meta, split, seed))


def prefix(meta: MetadataConfig, values: Mapping[str, str]) -> str:
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
    return _digest({"documents": documents_fingerprint(cfg), "heldout": cfg.heldout,
                    "max_documents": cfg.max_documents, "seed": seed})


def documents_fingerprint(cfg: DomainConfig) -> str:
    """A short hash of what the source's documents depend on: its settings and files, or for a
    builtin corpus the Python build it reads; not the split, the cap or the metadata."""
    parts: dict[str, Any] = cfg.model_dump(exclude={"max_epochs", "metadata", "heldout", "max_documents"})
    kind = source_kind(cfg.source)
    if kind == "builtin":
        parts["python"] = builtin.installation(cfg.source.removeprefix("builtin:"))
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


_cuts: dict[str, Cut] = {}  # per domain fingerprint (seed included): both splits need it


def _cut(cfg: DomainConfig, seed: int) -> Cut:
    """The held-out cut, from one pass over the documents' keys (kept for the other split)."""
    key = fingerprint(cfg, seed)
    if key not in _cuts:
        hashes = (text_hash(text) for text, _ in _documents(cfg, None))
        chunks = (seeded_keys(np.fromiter(chunk, dtype=KEY), seed) for chunk in iter(lambda: list(islice(hashes, 4096)), []))
        _cuts[key] = find_cut(chunks, cfg.heldout)
    return _cuts[key]


def _split(cfg: DomainConfig, meta: MetadataConfig | None, split: Split, seed: int) -> Iterator[Document]:
    """The split's documents; a bad split name or a domain too small for its held-out split fails here, not later."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    cut = _cut(cfg, seed)
    check_size(cfg, cut)
    return _chosen(cut, _documents(cfg, meta), split == "heldout", seed)


def _chosen(cut: Cut, documents: Iterator[Document], held: bool, seed: int) -> Iterator[Document]:
    for position, document in enumerate(documents):
        key = seeded_keys(np.array([text_hash(document[0])], dtype=KEY), seed)
        if bool(cut.held(key, position)[0]) == held:
            yield document


def _documents(cfg: DomainConfig, meta: MetadataConfig | None) -> Iterator[Document]:
    """Every non-empty document in the source's order, the first ``max_documents`` only, with the
    values ``meta``'s prefix reads (none without it)."""
    documents = (document for unit in plan_units(cfg) for document in unit_documents(cfg, meta, unit))
    return islice(documents, cfg.max_documents)


def _row_fields(meta: MetadataConfig | None) -> tuple[str, ...]:
    return () if meta is None else meta.row_fields
