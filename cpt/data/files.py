"""Documents of local files: plain text (one document per file), JSON lines and parquet.

The format follows the file name; text and JSON lines may be gzipped. Every problem is a
:class:`~cpt.errors.CptError` naming the file, so a recipe's source is reported, not a traceback.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from cpt.errors import CptError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROWS_PER_BATCH = 1024


def local_files(source: str) -> list[Path]:
    """The files a source names: one path, or every file a glob matches, sorted."""
    pattern = os.path.expanduser(source)
    if any(char in pattern for char in "*?["):
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


def _format(path: Path) -> Literal["text", "jsonl", "parquet"]:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES) and not path.name.lower().endswith(".gz"):
        return "parquet"
    known = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise CptError(
        f"{path}: unknown file type; expected one of {known} (text and JSON lines may end in .gz)", where="source"
    )


def check_file(path: Path, text_field: str) -> None:
    """Fail on a file that cannot be read as documents, without reading them all."""
    kind = _format(path)
    if not os.access(path, os.R_OK):
        raise CptError(f"{path} is not readable", where="source")
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise CptError(f"{path} is not a readable parquet file: {e}", where="source") from e
        if text_field not in schema.names:
            columns = ", ".join(schema.names)
            raise CptError(f"{path} has no column {text_field!r}; its columns: {columns}", where="source")


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def file_texts(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file in file order (empty ones included)."""
    kind = _format(path)
    try:
        if kind == "text":
            with _open_text(path) as f:
                yield f.read()
        elif kind == "jsonl":
            yield from _jsonl_texts(path, text_field)
        else:
            yield from _parquet_texts(path, text_field)
    except UnicodeDecodeError as e:
        raise CptError(f"{path} is not UTF-8 text: {e}", where="source") from e
    except OSError as e:
        raise CptError(f"cannot read {path}: {e}", where="source") from e


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CptError(
                    f"{path}:{line_no}: expected one JSON object per line ({e.msg}); "
                    "use hf:json for other JSON layouts",
                    where="source",
                ) from e
            if not isinstance(row, dict) or text_field not in row:
                raise CptError(f"{path}:{line_no}: no field {text_field!r}", where="source")
            yield as_text(row[text_field], f"{path}:{line_no}")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    check_file(path, text_field)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield as_text(value, f"{path}: column {text_field!r}")


def as_text(value: object, where: str) -> str:
    """A document's text from a field or column: a missing value is an empty document."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CptError(f"{where}: expected text, found {type(value).__name__}", where="source")
    return value


def file_stamp(path: Path) -> list[Any]:
    """What identifies a file's contents cheaply: its path, size and modification time."""
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]
