"""Documents of local files: plain text (one document per file), JSON lines and parquet.

The format follows the file name; text and JSON lines may be gzipped. Every problem is a
:class:`~cpt.errors.CptError` naming the file, so a recipe's source is reported, not a traceback.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

from cpt.errors import CptError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROWS_PER_BATCH = 1024
GLOB_CHARS = "*?["
Format = Literal["text", "jsonl", "parquet"]
Document = tuple[str, Mapping[str, str]]  # a text and the metadata values read with it, by name


def local_files(source: str) -> list[Path]:
    """The files a source names: one path, or every file a glob matches, sorted."""
    pattern = os.path.expanduser(source)
    if _is_glob(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise CptError(f"no file matches {source!r}", where="source")
        return files
    path = Path(pattern)
    if path.is_dir():
        raise CptError(f"{source} is a directory: name its files with a glob such as {source}/*.jsonl", where="source")
    if not path.is_file():
        raise CptError(f"no such file: {source}", where="source")
    return [path]


def glob_root(source: str) -> Path:
    """The directory a source's files are named from: its leading parts without wildcards, or a file's own folder."""
    path = Path(os.path.expanduser(source))
    fixed = list(itertools.takewhile(lambda part: not _is_glob(part), path.parts))
    return Path(*fixed) if len(fixed) < len(path.parts) else path.parent


def _is_glob(pattern: str) -> bool:
    return any(char in pattern for char in GLOB_CHARS)


def suffix_format(name: str) -> Format | None:
    """The format a file name (or a glob's) ends in; None when it names none of them."""
    name = name.lower()
    plain = name.removesuffix(".gz")
    if plain.endswith(TEXT_SUFFIXES):
        return "text"
    if plain.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def file_format(path: Path) -> Format:
    """A file's format, from its name."""
    kind = suffix_format(path.name)
    if kind is None:
        known = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
        raise CptError(
            f"{path}: unknown file type; expected one of {known} (text and JSON lines may end in .gz)", where="source"
        )
    return kind


def check_file(path: Path, fields: Sequence[str]) -> None:
    """Fail on a file that cannot be read as documents, without reading them all (a parquet file: its columns)."""
    kind = file_format(path)
    if not os.access(path, os.R_OK):
        raise CptError(f"{path} is not readable", where="source")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise CptError(f"{path} is not a readable parquet file: {e}", where="source") from e
        missing = [name for name in fields if name not in schema.names]
        if missing:
            columns = ", ".join(schema.names)
            raise CptError(f"{path} has no column {missing[0]!r}; its columns: {columns}", where="source")


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def file_documents(
    path: Path, text_field: str, fields: Sequence[str] = (), span: tuple[int, int] | None = None
) -> Iterator[Document]:
    """The documents of one file in file order (empty ones included), each with its row's values of ``fields``.

    A text file is one document and has no fields. ``span``: only the lines of a plain JSON-lines
    file that start in bytes ``[start, end)``, or row groups ``[start, end)`` of a parquet file.
    """
    kind = file_format(path)
    try:
        if kind == "text":
            with _open_text(path) as f:
                yield f.read(), {}
        elif kind == "jsonl":
            yield from _jsonl_documents(path, text_field, fields, span)
        else:
            yield from _parquet_documents(path, text_field, fields, span)
    except UnicodeDecodeError as e:
        raise CptError(f"{path} is not UTF-8 text: {e}", where="source") from e
    except OSError as e:
        raise CptError(f"cannot read {path}: {e}", where="source") from e


def _jsonl_documents(path: Path, text_field: str, fields: Sequence[str], span: tuple[int, int] | None) -> Iterator[Document]:
    if span is None:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield _json_row(line, path, lambda: line_no, text_field, fields)
        return
    start, end = span
    with open(path, "rb") as f:
        if start > 0:  # the line running across ``start`` belongs to the range before
            f.seek(start - 1)
            f.readline()
        while (offset := f.tell()) < end:
            raw = f.readline()
            if not raw:
                break
            if raw.strip():
                yield _json_row(raw.decode("utf-8"), path, lambda: _line_number(path, offset), text_field, fields)


def _json_row(line: str, path: Path, line_no: Callable[[], int], text_field: str, fields: Sequence[str]) -> Document:
    """One line's document; ``line_no`` is asked only for an error message (counting lines costs a read)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CptError(
            f"{path}:{line_no()}: expected one JSON object per line ({e.msg}); use hf:json for other JSON layouts",
            where="source",
        ) from e
    return row_document(row, text_field, fields, lambda: f"{path}:{line_no()}")


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte ``offset``."""
    lines = 1
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            lines += chunk.count(b"\n")
            offset -= len(chunk)
    return lines


def row_group_sizes(path: Path) -> list[int]:
    """Uncompressed bytes of each row group of a parquet file: what a share of it is measured in."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as e:
        raise CptError(f"{path} is not a readable parquet file: {e}", where="source") from e
    return [meta.row_group(group).total_byte_size for group in range(meta.num_row_groups)]


def _parquet_documents(path: Path, text_field: str, fields: Sequence[str], span: tuple[int, int] | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([text_field, *fields]))
    check_file(path, columns)
    parquet = pq.ParquetFile(path)
    groups = None if span is None else list(range(*span))
    if groups == []:
        return
    for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns, row_groups=groups):
        yield from batch_documents(batch.to_pydict(), text_field, fields, str(path))


Where = str | Callable[[], str]  # a place for an error message, worked out only when one is raised


def row_document(row: object, text_field: str, fields: Sequence[str], where: Where) -> Document:
    """One row's document: a missing field is an error, a null text an empty document."""
    for name in (text_field, *fields):
        if not isinstance(row, dict) or name not in row:
            raise CptError(f"{_place(where)}: no field {name!r}", where="source")
    return as_text(row[text_field], where), {
        name: as_value(row[name], lambda name=name: f"{_place(where)}: field {name!r}") for name in fields
    }


def batch_documents(
    batch: Mapping[str, list[Any]], text_field: str, fields: Sequence[str], where: str
) -> Iterator[Document]:
    """The documents of rows given column by column, as :func:`row_document` gives one row's."""
    text_where = f"{where}: column {text_field!r}"
    texts = (as_text(value, text_where) for value in batch[text_field])
    values = [[as_value(value, f"{where}: column {name!r}") for value in batch[name]] for name in fields]
    for text, *row in zip(texts, *values):
        yield text, dict(zip(fields, row))


def as_text(value: object, where: Where) -> str:
    """A document's text from a field or column: a missing value is an empty document."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CptError(f"{_place(where)}: expected text, found {type(value).__name__}", where="source")
    return value


def as_value(value: object, where: Where) -> str:
    """A metadata value from a field or column: text, or a number written as text; a null is an error, since a
    prefix without its value would teach the model a wrong one."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    found = "null" if value is None else type(value).__name__
    raise CptError(f"{_place(where)}: expected text or a number as metadata, found {found}", where="source")


def _place(where: Where) -> str:
    return where if isinstance(where, str) else where()


def file_stamp(path: Path) -> list[Any]:
    """What identifies a file's contents cheaply: its path, size and modification time."""
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]
