"""Tokenize one unit of a domain into its cache directory: the work of one preparation worker.

A unit directory holds its documents' tokens as one stream, each document followed by EOS (and,
in a domain's metadata variant, preceded by its metadata prefix), with:

- ``tokens.bin``: the stream;
- ``starts.bin``: uint64 offset of each document's first token (its prefix, if any);
- ``hashes.bin``: uint64 hash of each document's text, from which any seed selects the held-out split;
- ``mask.bin`` (metadata variant only): uint8 per token, 1 where the token is a target;
- ``meta.json``: counts, written last.

It appears by one atomic rename, so a killed worker leaves nothing a reader would take for a unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from cpt import faults
from cpt.config.data import DomainConfig
from cpt.data.selection import KEY, text_hash
from cpt.data.sources import prefix
from cpt.data.units import Unit, unit_documents
from cpt.io import io_errors, staged_entry

log = logging.getLogger(__name__)
STARTS = np.dtype("<u8")
FORMAT = 3
# A batch of text handed to the Rust encoder at once: large enough to keep its threads busy,
# small enough that its encodings (~100 bytes per token) stay a bounded amount of memory.
BATCH_CHARS = 1 << 20
BATCH_DOCUMENTS = 1024


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker process needs to tokenize one unit, and nothing it cannot pickle."""

    cfg: DomainConfig
    unit: Unit
    tokenizer: str  # the Rust tokenizer's JSON definition
    eos: int
    dtype: str
    metadata: bool  # the variant with metadata prefixes
    out: Path
    limit: int | None = None  # only the unit's first documents (a domain's max_documents ends inside it)


@dataclass(frozen=True)
class UnitStats:
    n_documents: int
    n_tokens: int
    n_masked: int  # prefix tokens (not targets); 0 in the plain variant
    size: int  # bytes of source text the unit was planned as


def encode_unit(job: UnitJob) -> tuple[Path, UnitStats]:
    """Tokenize the unit, unless a sound directory of it is already there; where it is, and its counts.

    With a ``limit``, only the unit's first documents are read, into ``<unit>-first<limit>``; a unit
    that ends before the limit is whole, and goes where an uncapped run would look for it."""
    cut = job.out if job.limit is None else limited_dir(job.out, job.limit)
    for candidate in dict.fromkeys((job.out, cut)):
        found = read_unit(candidate)
        if found is not None:
            return candidate, found
        if candidate.exists():
            log.warning("ignoring the damaged or unfinished unit %s: tokenizing it again", candidate)
    faults.point("prepare.unit", job.out)
    meta = job.cfg.metadata if job.metadata else None
    documents = unit_documents(job.cfg, meta, job.unit)
    records = ((prefix(meta, values) if meta else "", text) for text, values in islice(documents, job.limit))
    names = ("tokens.bin", "starts.bin", "hashes.bin", *(("mask.bin",) if job.metadata else ()))
    # Readers report their own failures (CptError naming the source): an OSError here is a failed write.
    with staged_entry(cut, lambda d: read_unit(d) is not None) as staging, io_errors(cut):
        with ExitStack() as files:
            opened = {name: files.enter_context(open(staging / name, "wb")) for name in names}
            counts = _encode(records, _backend(job.tokenizer), job.eos, np.dtype(job.dtype), opened["tokens.bin"],
                             opened["starts.bin"], opened["hashes.bin"], opened.get("mask.bin"))
        stats = UnitStats(*counts, job.unit.size)
        whole = job.limit is None or next(documents, None) is None
        (staging / "meta.json").write_text(json.dumps(asdict(stats) | {"format": FORMAT, "dtype": job.dtype,
                                                                       "metadata": job.metadata}))
    if whole and cut != job.out:  # the cap did not cut it: publish it as the whole unit
        try:
            os.rename(cut, job.out)
        except OSError:  # another process published the whole unit first
            shutil.rmtree(cut, ignore_errors=True)
        cut = job.out
    return cut, stats


def limited_dir(out: Path, limit: int) -> Path:
    """The directory of a unit's first ``limit`` documents."""
    return out.with_name(f"{out.name}-first{limit}")


def read_unit(out: Path) -> UnitStats | None:
    """The unit's counts if its directory is complete and of this format; None otherwise."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        if meta.pop("format") != FORMAT:
            return None
        dtype, metadata = np.dtype(meta.pop("dtype")), meta.pop("metadata")
        stats = UnitStats(**meta)
        sizes = {"tokens.bin": stats.n_tokens * dtype.itemsize, "starts.bin": stats.n_documents * 8,
                 "hashes.bin": stats.n_documents * 8}
        if metadata:
            sizes["mask.bin"] = stats.n_tokens
        if all((out / name).stat().st_size == size for name, size in sizes.items()):
            return stats
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return None


_backends: dict[str, Tokenizer] = {}


def _backend(definition: str) -> Tokenizer:
    """The Rust tokenizer of a JSON definition, built once per process."""
    key = hashlib.sha256(definition.encode()).hexdigest()
    if key not in _backends:
        _backends[key] = Tokenizer.from_str(definition)
    return _backends[key]


def _encode(records: Iterable[tuple[str, str]], backend: Tokenizer, eos: int, dtype: np.dtype, tokens, starts, hashes,
            mask) -> tuple[int, int, int]:
    """Write the stream batch by batch. Prefix and text are encoded apart, so a document's text has
    the same tokens in both variants and its prefix tokens are known exactly. ``encode_batch_fast``
    is ``encode_batch`` without character offsets, which packing never needs.
    Returns (documents, tokens, masked tokens)."""
    n_documents = n_tokens = n_masked = 0
    for batch in _batches(records):
        ids = [encoding.ids for encoding in backend.encode_batch_fast([text for _, text in batch], add_special_tokens=False)]
        for doc_ids in ids:
            doc_ids.append(eos)
        targets = np.array([len(doc_ids) for doc_ids in ids], dtype=np.int64)
        heads = np.zeros(len(batch), dtype=np.int64)
        prefixed = [(i, head) for i, (head, _) in enumerate(batch) if head]
        if prefixed:
            encoded = backend.encode_batch_fast([head for _, head in prefixed], add_special_tokens=False)
            for (i, _), encoding in zip(prefixed, encoded):
                ids[i] = encoding.ids + ids[i]
                heads[i] = len(encoding.ids)
        lengths = heads + targets
        tokens.write(np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum())).data)
        starts.write((n_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])).astype(STARTS).data)
        hashes.write(np.array([text_hash(text) for _, text in batch], dtype=KEY).data)
        if mask is not None:
            pattern = np.tile(np.array([0, 1], np.uint8), len(batch))
            mask.write(np.repeat(pattern, np.stack([heads, targets], axis=1).reshape(-1)).data)
        n_documents += len(batch)
        n_tokens += int(lengths.sum())
        n_masked += int(heads.sum())
    return n_documents, n_tokens, n_masked


def _batches(records: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for record in records:
        batch.append(record)
        chars += len(record[0]) + len(record[1])
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
