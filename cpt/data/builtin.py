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
from collections.abc import Callable, Iterator
from pathlib import Path

from cpt.errors import CptError

# Directories of the standard library that are fixtures, tools or third-party code, not its code.
_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def installation() -> list[str]:
    """What the builtin corpora depend on: this Python's version and standard library."""
    return [sys.version, sysconfig.get_paths()["stdlib"]]


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


def _python_stdlib() -> Iterator[tuple[str, str]]:
    for path in stdlib_files():
        with tokenize.open(path) as f:  # honours a module's coding declaration
            yield f.read(), module_path(path)


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


def _python_tests() -> Iterator[tuple[str, str]]:
    for path in stdlib_test_files():
        try:
            with tokenize.open(path) as f:
                yield f.read(), module_path(path)
        except (SyntaxError, UnicodeDecodeError):  # the suite holds deliberately mis-encoded files
            continue


def _python_docs() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name], name
    yield from _stdlib_docstrings()


@functools.cache
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """Parsing the whole standard library takes seconds, so its docstrings (~1.7 MB) are kept once read."""
    return tuple((module_docstrings(path), module_name(path)) for path in stdlib_files())


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


# The documents of builtin:<name> in their fixed order, each with its natural metadata value, for each
# name of cpt.config.data.BUILTINS.
CORPORA: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "python-stdlib": _python_stdlib,
    "python-docs": _python_docs,
    "python-tests": _python_tests,
}
