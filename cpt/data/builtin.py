"""The builtin corpora: real files of this Python installation, so that a run needs no download.

Code (the standard library's modules, its test suite) and English prose (pydoc topics and the
library's docstrings, read with :mod:`ast`, never imported). Each document comes with its natural
metadata value, the name a reader would know it by: a module's path (``json/decoder.py``), a
topic's name, a module's dotted name (``json.decoder``).
"""

from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cpt.errors import CptError

# Directories of the standard library that are fixtures, tools or third-party code, not its code.
_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_path(path: Path) -> str:
    """A module's path from the standard library's root, with ``/`` on every system."""
    return path.relative_to(_stdlib_root()).as_posix()


def module_name(path: Path) -> str:
    """A module's dotted name: ``json/decoder.py`` is ``json.decoder``, ``json/__init__.py`` is ``json``."""
    parts = path.relative_to(_stdlib_root()).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` modules, without tests, idlelib or installed packages."""
    root = _stdlib_root()
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED]
        found += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(found)


def stdlib_test_files() -> list[Path]:
    """The standard library's own test suite (``test/``): code of another style than the library's.

    Debian and Ubuntu move the suite into a separate package and keep only ``test/support`` and
    regrtest, so the suite counts as installed when its tests of the grammar are there.
    """
    root = _stdlib_root() / "test"
    if not (root / "test_grammar.py").is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise CptError(
            f"builtin:python-tests needs the standard library's test suite, which this Python lacks (no {root}/"
            f"test_grammar.py): install libpython{version}-testsuite (Debian, Ubuntu) or python{version}-test (Fedora)",
            where="source",
        )
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)


@dataclass(frozen=True)
class Item:
    """One document of a builtin corpus, named so that any process can read it alone."""

    kind: str  # "module", "test", "topic" or "docstrings"
    name: str  # a path from the standard library's root, or a pydoc topic
    size: int  # bytes to read: what a share of the work is measured in


def items(corpus: str) -> list[Item]:
    """The documents of ``builtin:<corpus>`` in their fixed order (each read by :func:`read_item`);
    listed once per process and standard library, as every unit of the corpus needs the list."""
    return _items(corpus, _stdlib_root())


@functools.cache
def _items(corpus: str, root: Path) -> list[Item]:
    if corpus == "python-stdlib":
        return [Item("module", module_path(p), p.stat().st_size) for p in _stdlib_files_or_error()]
    if corpus == "python-tests":
        return [Item("test", module_path(p), p.stat().st_size) for p in stdlib_test_files()]
    if corpus == "python-docs":
        topics = _pydoc_topics()
        return [Item("topic", name, len(topics[name])) for name in sorted(topics)] + [
            Item("docstrings", module_path(p), p.stat().st_size) for p in _stdlib_files_or_error()
        ]
    raise ValueError(f"unknown builtin corpus {corpus!r}")


def read_item(item: Item) -> tuple[str, str] | None:
    """(text, natural metadata value) of one document; None for a file of the test suite that is
    deliberately mis-encoded."""
    if item.kind == "topic":
        return _pydoc_topics()[item.name], item.name
    path = _stdlib_root() / item.name
    try:
        if item.kind == "docstrings":
            return module_docstrings(path), module_name(path)
        with tokenize.open(path) as f:  # honours a module's coding declaration
            return f.read(), item.name
    except (SyntaxError, UnicodeDecodeError) as e:
        if item.kind == "test":
            return None
        raise CptError(f"cannot read {path}: {e}", where="source") from None
    except OSError as e:
        raise CptError(f"cannot read {path}: {e.strerror or e}", where="source") from None


def documents(corpus: str) -> Iterator[tuple[str, str]]:
    """Every document of ``builtin:<corpus>`` in order, with its natural metadata value."""
    for item in items(corpus):
        read = read_item(item)
        if read is not None:
            yield read


def installation(corpus: str) -> dict[str, str | int]:
    """What a builtin corpus depends on: this Python's build, its standard library's path and how
    many files the corpus reads there (a Debian Python without its test suite reads fewer)."""
    return {"python": sys.version, "stdlib": str(_stdlib_root()), "files": len(items(corpus))}


def _stdlib_files_or_error() -> list[Path]:
    files = stdlib_files()
    if not files:
        raise CptError(
            f"this Python has no standard library sources under {_stdlib_root()} (an embedded or stripped build?): "
            "the builtin corpora read them",
            where="source",
        )
    return files


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CptError(
            "builtin:python-docs needs the standard library's pydoc_data package, which this Python lacks",
            where="source",
        ) from None
    return topics


@functools.cache
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
