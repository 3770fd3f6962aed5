"""Checks of the paths a user names, each written once: files to read, outputs to create, and
names that are either a local directory or a Hugging Face hub id.

Every check raises :class:`CptError` naming the offending path, before anything is computed or
written, so a bad path costs the user one line and no half-made output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cpt.errors import CptError


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; missing, unreadable, a directory or not text: ``<path>: cannot read file: ...``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CptError(f"cannot read file: {exc.strerror or exc}", str(path)) from None
    except UnicodeDecodeError:
        raise CptError("cannot read file: not UTF-8 text", str(path)) from None


def check_output_dir(path: Path) -> None:
    """A directory to write into, existing or to be made: neither it nor a parent may be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CptError("exists and is not a directory", str(path))
    _check_parents(path)


def check_output_file(path: Path, flag: str) -> None:
    """A file to write (``flag`` names the option that gave it): not a directory, and not under a file."""
    path = Path(path)
    if path.is_dir():
        raise CptError(f"{path} is a directory; give a file path", flag)
    _check_parents(path)


def _check_parents(path: Path) -> None:
    """The nearest existing parent must be a directory, or creating ``path`` would fail after the work."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CptError("exists and is not a directory", str(parent))
            return


def local_dir(name: str, where: str) -> Path | None:
    """The local directory ``name`` names, or None when it is a Hugging Face hub id.

    A name that is clearly a path (absolute, or starting with ``.`` or ``~``) must exist, and a
    path that exists must be a directory; anything else is left to the hub to resolve.
    """
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CptError(f"{name} is not a directory", where)
        return local
    if local.is_absolute() or name.startswith("."):
        raise CptError(f"{name}: no such directory", where)
    return None


def gguf_path(name: str, file: str, where: str) -> str:
    """What transformers' ``gguf_file=`` gets for the GGUF file ``file`` of ``name`` (a local directory or
    hub id), checked before anything loads: the gguf package that reads it must be installed, and a local
    directory must hold the file. A local file goes by its absolute path, because transformers looks a
    bare name up in the working directory before the model's."""
    if importlib.util.find_spec("gguf") is None:
        raise CptError(f"{name}: reading {file} needs the gguf package (pip install gguf)", where)
    local = local_dir(name, where)
    if local is None:
        return file
    path = local / file
    if not path.is_file():
        raise CptError(f"{name}: no file {file}", where)
    return str(path.resolve())
