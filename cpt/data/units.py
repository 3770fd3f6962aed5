"""Shares of a domain's documents that any process can read alone: the units of parallel preparation.

A domain is cut into units of about ``UNIT_BYTES`` of source text, in document order: runs of
builtin documents or of whole files, byte ranges of a large JSON-lines file (cut where lines
start), runs of a parquet file's row groups, row ranges of a ``datasets`` dataset. The cut depends
on the source alone, never on how many workers or machines prepare it, so every unit's tokens are
the same whoever makes them, and the prepared cache is identical for every worker count. A
streamed hub dataset has no known size: each of its shards (data files) is a unit, read once as
it streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cpt.config.data import DomainConfig, MetadataConfig, metadata_problem, source_kind
from cpt.data import builtin, files, hub
from cpt.data.files import Document
from cpt.errors import CptError

UNIT_BYTES = 32 << 20


@dataclass(frozen=True)
class Part:
    """A contiguous piece of a source: items ``[start, end)`` of a builtin corpus, a whole file
    (``start``/``end`` None), bytes ``[start, end)`` of a JSON-lines file, row groups of a parquet
    file, rows of a dataset, or shard ``start`` of ``end`` of a streamed one."""

    path: str  # the file; "" for builtin corpora and datasets
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class Unit:
    index: int
    parts: tuple[Part, ...]
    size: int  # bytes of source text (an estimate for datasets); 0 when unknown (a stream)


def plan_units(cfg: DomainConfig) -> list[Unit]:
    """The domain's units in document order."""
    unit_bytes = UNIT_BYTES
    kind = source_kind(cfg.source)
    if kind == "builtin":
        sizes = [item.size for item in builtin.items(_corpus(cfg))]
        return [Unit(i, (Part("", a, b),), total) for i, (a, b, total) in enumerate(runs(sizes, unit_bytes))]
    if kind == "hf":
        return _dataset_units(cfg, unit_bytes)
    pieces: list[tuple[Part, int]] = []
    for path in files.local_files(cfg.source):
        pieces += _file_parts(path, unit_bytes)
    return _group(pieces, unit_bytes)


def unit_documents(cfg: DomainConfig, meta: MetadataConfig | None, unit: Unit) -> Iterator[Document]:
    """The non-empty documents of one unit in order, each with the values ``meta``'s prefix reads
    (none without it): row fields, or a builtin document's or text file's own name."""
    kind = source_kind(cfg.source)
    natural = meta is not None and meta.natural
    fields = () if meta is None else meta.row_fields
    for part in unit.parts:
        if kind == "builtin":
            documents = _builtin_documents(cfg, part, natural)
        elif kind == "hf":
            documents = hub.hf_documents(cfg, fields, share=None if part.start is None else (part.start, part.end))
        else:
            documents = _file_documents(cfg, meta, Path(part.path), part, natural)
        yield from (document for document in documents if document[0].strip())


def check_fits(meta: MetadataConfig | None, path: Path) -> None:
    """Fail on a file whose documents ``meta`` cannot tag: a glob may match both text files and rows."""
    problem = meta is not None and metadata_problem(meta, rows=files.file_format(path) != "text")
    if problem:
        raise CptError(f"{path}: {problem}", where="metadata")


def _file_documents(cfg: DomainConfig, meta: MetadataConfig | None, path: Path, part: Part, natural: bool) -> Iterator[Document]:
    check_fits(meta, path)
    fields = () if meta is None else meta.row_fields
    documents = files.file_documents(path, cfg.text_field, fields, span=None if part.start is None else (part.start, part.end))
    if not natural or files.file_format(path) != "text":
        return documents
    name = path.relative_to(files.glob_root(cfg.source)).as_posix()
    return ((text, {"value": name}) for text, _ in documents)


def _corpus(cfg: DomainConfig) -> str:
    return cfg.source.removeprefix("builtin:")


def _builtin_documents(cfg: DomainConfig, part: Part, natural: bool) -> Iterator[Document]:
    listed = builtin.items(_corpus(cfg))
    assert part.start is not None and part.end is not None
    for item in listed[part.start : part.end]:
        read = builtin.read_item(item)
        if read is not None:
            yield read[0], {"value": read[1]} if natural else {}


def runs(sizes: list[int], unit_bytes: int) -> list[tuple[int, int, int]]:
    """Consecutive items as ``(first, end, bytes)`` runs of at least ``unit_bytes`` (the last may be
    less); one empty run for no items."""
    found: list[tuple[int, int, int]] = []
    first = total = 0
    for i, size in enumerate(sizes):
        total += size
        if total >= unit_bytes or i == len(sizes) - 1:
            found.append((first, i + 1, total))
            first, total = i + 1, 0
    return found or [(0, 0, 0)]


def _file_parts(path: Path, unit_bytes: int) -> list[tuple[Part, int]]:
    """A file as parts: byte ranges of a plain JSON-lines file, row-group runs of a parquet file,
    the whole file otherwise (a text file is one document; gzip cannot be entered midway)."""
    size = path.stat().st_size
    kind = files.file_format(path)
    if kind == "jsonl" and not path.name.lower().endswith(".gz"):  # read as bytes, whatever its size
        return [(Part(str(path), a, min(a + unit_bytes, size)), min(unit_bytes, size - a))
                for a in range(0, max(size, 1), unit_bytes)]
    if kind == "parquet":
        return [(Part(str(path), a, b), total) for a, b, total in runs(files.row_group_sizes(path), unit_bytes)]
    return [(Part(str(path)), size)]


def _group(pieces: list[tuple[Part, int]], unit_bytes: int) -> list[Unit]:
    """Consecutive parts into units of about ``unit_bytes`` (small files travel together)."""
    return [Unit(i, tuple(part for part, _ in pieces[a:b]), total)
            for i, (a, b, total) in enumerate(runs([size for _, size in pieces], unit_bytes))]


def _dataset_units(cfg: DomainConfig, unit_bytes: int) -> list[Unit]:
    """A stream is cut into its shards (data files; the size of each is unknown until read); a
    prepared dataset into row ranges of about ``unit_bytes``."""
    if cfg.hf is not None and cfg.hf.streaming:
        count = hub.stream_shards(cfg)
        return [Unit(i, (Part("", i, count),), 0) for i in range(count)]
    rows, nbytes = hub.dataset_size(cfg)
    per_unit = max(1, rows * unit_bytes // max(nbytes, 1))
    return [
        Unit(i, (Part("", a, min(a + per_unit, rows)),), min(per_unit, rows - a) * nbytes // max(rows, 1))
        for i, a in enumerate(range(0, max(rows, 1), per_unit))
    ]
