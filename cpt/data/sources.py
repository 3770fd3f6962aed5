"""Raw text documents of one data domain: builtin corpora, local files or Hugging Face datasets.

Every source yields its non-empty documents in one fixed order. The held-out split is a seeded,
exact-size random subset of that order, picked in a single streaming pass by selection sampling
(Knuth's Algorithm S), so neither split is ever held in memory and the two are disjoint by
construction. Streaming hub datasets have no known size: their first N documents are held out.
"""

from __future__ import annotations

import ast
import functools
import glob
import gzip
import hashlib
import json
import os
import random
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal, TextIO

from pydantic import Field, field_validator, model_validator

from cpt.errors import CptError
from cpt.schema import Strict

BUILTINS = ("python-stdlib", "python-docs", "python-tests")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# Directories of the standard library that are fixtures, tools or third-party code, not its code.
_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_ROWS_PER_BATCH = 1024

Split = Literal["train", "heldout"]


class HFOptions(Strict):
    """Arguments passed through to ``datasets.load_dataset``."""

    name: str | None = Field(
        default=None, description="The dataset's configuration (subset) name: load_dataset's second argument."
    )
    split: str = Field(default="train", description="The dataset split to read documents from.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        default=None,
        description="Files for a builder such as hf:json or hf:parquet: a path or glob, a list of them, "
        "or a mapping from split name to them.",
    )
    revision: str | None = Field(
        default=None, description="Branch, tag or commit of the hub dataset; null: its default branch."
    )
    streaming: bool = Field(
        default=False,
        description="Read the dataset as a stream instead of downloading it first; heldout must then be "
        "a count, taken from the first documents.",
    )


class DomainConfig(Strict):
    """Where one domain's documents come from and how its held-out split is cut."""

    source: str = Field(
        description="builtin:python-stdlib, builtin:python-docs or builtin:python-tests; `hf:<dataset id or builder>`; "
        "or a local file or glob (.txt/.md/.rst/.text: one document per file; .jsonl/.json: one JSON object "
        "per line; .parquet; text and JSON lines may be gzipped)."
    )
    text_field: str = Field(
        default="text",
        min_length=1,
        description="The JSON field or column holding a document's text (JSON lines, parquet, hf: datasets).",
    )
    hf: HFOptions | None = Field(
        default=None, description="Options for datasets.load_dataset; only for hf: sources."
    )
    heldout: float = Field(
        default=0.05,
        description="Documents held out for evaluation, never trained on: a count when >= 1, a fraction of the "
        "domain's documents (at least one) when < 1, 0 for none. A seeded random subset; the first ones "
        "of a stream.",
    )
    max_documents: int | None = Field(
        default=None,
        gt=0,
        description="Use at most this many training documents (held-out ones not counted); null: all of them.",
    )
    max_epochs: float | None = Field(
        default=None,
        gt=0,
        description="The most times a stage may repeat this domain's training tokens; a mixture that asks for more "
        "is scaled down to it, the other domains taking the rest. null: no cap.",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a builtin corpus, an hf: dataset, or a local file or glob")
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BUILTINS:
            known = ", ".join(f"builtin:{name}" for name in BUILTINS)
            raise ValueError(f"unknown builtin corpus {value!r}; known: {known}")
        if value.startswith("hf:") and not value.removeprefix("hf:").strip():
            raise ValueError("hf: needs a hub dataset id or a builder name, e.g. hf:json")
        return value

    @field_validator("heldout")
    @classmethod
    def _heldout_size(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must be >= 0")
        if value >= 1 and value != int(value):
            raise ValueError("must be a whole number of documents when >= 1, or a fraction of them when < 1")
        return value

    @model_validator(mode="after")
    def _hf_options_fit_source(self) -> DomainConfig:
        if self.hf is not None and source_kind(self.source) != "hf":
            raise ValueError(f"hf options apply only to hf: sources, not to {self.source!r}")
        if self.hf is not None and self.hf.streaming and 0 < self.heldout < 1:
            raise ValueError(
                "a streamed dataset has no known size: give heldout as a document count (>= 1), "
                f"not the fraction {self.heldout}"
            )
        return self


def source_kind(source: str) -> Literal["builtin", "hf", "local"]:
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("hf:"):
        return "hf"
    return "local"


def heldout_size(heldout: float, n_documents: int) -> int:
    """Documents held out of ``n_documents``: a count, or a rounded fraction of at least one."""
    if heldout >= 1:
        return int(heldout)
    if heldout == 0:
        return 0
    return max(1, round(heldout * n_documents))


def check_domain(cfg: DomainConfig) -> None:
    """Fail early on problems a run would otherwise hit later; never contacts the hub.

    Counting stops as soon as the domain is known to be large enough: the number of training
    documents, n - heldout_size(n), never decreases as n grows.
    """
    kind = source_kind(cfg.source)
    if kind == "hf":
        return
    if kind == "local":
        for path in _local_files(cfg.source):
            _check_file(path, cfg.text_field)
    n = 0
    for _ in _all_documents(cfg):
        n += 1
        if n - heldout_size(cfg.heldout, n) >= 1:
            return
    raise _too_small(cfg, n)


def iter_documents(cfg: DomainConfig, split: Split, seed: int) -> Iterator[str]:
    """Stream the documents of one split; the same (seed, source) always gives the same split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    documents = _all_documents(cfg)
    if cfg.hf is not None and cfg.hf.streaming:
        k = int(cfg.heldout)
        if split == "heldout":
            return islice(documents, k)
        return islice(documents, k, None if cfg.max_documents is None else k + cfg.max_documents)
    n = _count_documents(cfg)
    k = heldout_size(cfg.heldout, n)
    if n - k < 1:
        raise _too_small(cfg, n)
    rng = random.Random(hashlib.sha256(f"{seed}\0{cfg.source}".encode()).digest())
    wanted = split == "heldout"
    chosen = (doc for doc, held in zip(documents, _selection(n, k, rng)) if held == wanted)
    return islice(chosen, k if wanted else cfg.max_documents)


def fingerprint(cfg: DomainConfig, seed: int) -> str:
    """A short hash that changes whenever the documents of the domain's splits may change."""
    parts: dict[str, Any] = cfg.model_dump(exclude={"max_epochs"}) | {"seed": seed}
    kind = source_kind(cfg.source)
    if kind == "builtin":
        parts["python"] = [sys.version, sysconfig.get_paths()["stdlib"]]
    elif kind == "local":
        parts["files"] = [_file_stamp(path) for path in _local_files(cfg.source)]
    elif cfg.hf is not None and cfg.hf.data_files is not None:
        parts["files"] = [_file_stamp(Path(p)) for p in _local_data_files(cfg.hf.data_files)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _too_small(cfg: DomainConfig, n: int) -> CptError:
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


_counts: dict[str, int] = {}  # documents per source, keyed by fingerprint: both splits need it


def _count_documents(cfg: DomainConfig) -> int:
    key = fingerprint(cfg, seed=0)
    if key not in _counts:
        _counts[key] = sum(1 for _ in _all_documents(cfg))
    return _counts[key]


def _all_documents(cfg: DomainConfig) -> Iterator[str]:
    kind = source_kind(cfg.source)
    if kind == "builtin":
        texts = {"builtin:python-stdlib": _python_stdlib, "builtin:python-docs": _python_docs,
                 "builtin:python-tests": _python_tests}[cfg.source]()
    elif kind == "hf":
        texts = _hf_texts(cfg)
    else:
        texts = (text for path in _local_files(cfg.source) for text in _file_texts(path, cfg.text_field))
    return (text for text in texts if text.strip())


# --- builtin corpora: real files of this Python installation ---


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` modules, without tests, idlelib or installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED]
        found += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(found)


def _python_stdlib() -> Iterator[str]:
    for path in stdlib_files():
        with tokenize.open(path) as f:  # honours a module's coding declaration
            yield f.read()


def stdlib_test_files() -> list[Path]:
    """The standard library's own test suite (``test/``): code of another style than the library's.

    Debian and Ubuntu move the suite into a separate package and keep only ``test/support`` and
    regrtest, so the suite counts as installed when its tests of the grammar are there.
    """
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    if not (root / "test_grammar.py").is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise CptError(
            f"builtin:python-tests needs the standard library's test suite, which this Python lacks (no {root}/"
            f"test_grammar.py): install libpython{version}-testsuite (Debian, Ubuntu) or python{version}-test (Fedora)",
            where="source",
        )
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)


def _python_tests() -> Iterator[str]:
    for path in stdlib_test_files():
        try:
            with tokenize.open(path) as f:
                yield f.read()
        except (SyntaxError, UnicodeDecodeError):  # the suite holds deliberately mis-encoded files
            continue


def _python_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    yield from _stdlib_docstrings()


@functools.cache
def _stdlib_docstrings() -> tuple[str, ...]:
    """Parsing the whole standard library takes seconds, so its docstrings (~1.7 MB) are kept once read."""
    return tuple(module_docstrings(path) for path in stdlib_files())


def module_docstrings(path: Path) -> str:
    """The docstrings of a module, its classes and functions in source order, read without importing."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # a module this Python cannot parse contributes no prose
        return ""
    docs = [ast.get_docstring(node) for node in [tree, *_statements(tree)] if isinstance(node, _DOCSTRING_NODES)]
    return "\n\n".join(doc for doc in docs if doc)


def _statements(node: ast.AST) -> Iterator[ast.AST]:
    """Nested statements in source order; definitions never hide inside expressions, so skip those."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield child
            yield from _statements(child)


# --- local files ---


def _local_files(source: str) -> list[Path]:
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


def _check_file(path: Path, text_field: str) -> None:
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


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
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
            yield _as_text(row[text_field], f"{path}:{line_no}")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    _check_file(path, text_field)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROWS_PER_BATCH, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _as_text(value, f"{path}: column {text_field!r}")


def _as_text(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CptError(f"{where}: expected text, found {type(value).__name__}", where="source")
    return value


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


# --- Hugging Face datasets ---


def _hf_texts(cfg: DomainConfig) -> Iterator[str]:
    import datasets

    opts = cfg.hf or HFOptions()
    name = cfg.source.removeprefix("hf:")
    try:
        dataset = datasets.load_dataset(
            name,
            opts.name,
            split=opts.split,
            data_files=opts.data_files,
            revision=opts.revision,
            streaming=opts.streaming,
        )
    except Exception as e:  # datasets raises many unrelated types for one cause: the source cannot be read
        raise CptError(f"cannot load dataset {cfg.source}: {e}", where="source") from e
    columns = dataset.column_names
    if columns is not None and cfg.text_field not in columns:
        listed = ", ".join(columns)
        raise CptError(f"{cfg.source} has no column {cfg.text_field!r}; its columns: {listed}", where="source")
    if opts.streaming:
        for row in dataset:
            if cfg.text_field not in row:
                raise CptError(f"{cfg.source}: a row has no field {cfg.text_field!r}", where="source")
            yield _as_text(row[cfg.text_field], cfg.source)
        return
    for batch in dataset.select_columns([cfg.text_field]).iter(batch_size=_ROWS_PER_BATCH):
        for value in batch[cfg.text_field]:
            yield _as_text(value, cfg.source)


def _local_data_files(data_files: str | list[str] | dict[str, str | list[str]]) -> list[str]:
    """The local files among ``data_files`` (remote ones are identified by the options alone)."""
    groups = list(data_files.values()) if isinstance(data_files, dict) else [data_files]
    patterns = [p for group in groups for p in ([group] if isinstance(group, str) else group)]
    found = (p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    return sorted(p for p in found if os.path.isfile(p))
