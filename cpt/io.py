"""Files that are whole or absent: atomic writes, directory replacement and run-directory claims.

Every file cpt writes for later reading goes through here, so that a crash, a kill or a full disk
never leaves a half-written file that a later run would take for a good one: content goes to a
temporary sibling, is flushed to disk, and is renamed into place (then the directory entry is
flushed too). An ``OSError`` becomes a :class:`CptError` naming the path and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cpt import faults
from cpt.errors import CptError, first_line
from cpt.paths import check_output_dir


@contextmanager
def io_errors(path: Path | str) -> Iterator[None]:
    """Report an I/O failure (disk full, permission, ...) as one line naming ``path`` and the cause."""
    try:
        yield
    except OSError as exc:
        raise CptError(f"cannot write: {exc.strerror or exc}", where=str(getattr(exc, "filename", None) or path)) from None


# How torch's and safetensors' writers word a failed write (they raise RuntimeError and their own types).
_WRITE_FAILURE = re.compile(r"write failed|No space left|os error|IoError|Input/output error", re.IGNORECASE)


@contextmanager
def library_io_errors(path: Path | str) -> Iterator[None]:
    """Like :func:`io_errors` around a library's save call, whose writers wrap the OS error in their
    own words (torch reports a short write on a full disk as an "unexpected pos")."""
    with io_errors(path):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a failed write
            if isinstance(exc, (OSError, CptError)):
                raise
            if _disk_full(Path(path)):
                raise CptError(f"cannot write: {os.strerror(errno.ENOSPC)}", where=str(path)) from None
            if not _WRITE_FAILURE.search(str(exc)):
                raise
            raise CptError(f"cannot write: {first_line(exc)}", where=str(path)) from None


def _disk_full(path: Path) -> bool:
    """Whether the filesystem that holds ``path`` has (next to) no space left."""
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize < 64 * 1024


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    write_with(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any, **dump_kwargs: Any) -> None:
    write_text(path, json.dumps(data, **dump_kwargs) + ("\n" if dump_kwargs.get("indent") else ""))


def write_with(path: Path, write: Callable[[Path], Any]) -> None:
    """Let ``write(tmp)`` produce the file (a plot, a table...) at a temporary sibling, then publish it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with io_errors(path):
        try:
            write(tmp)
            faults.point("io.write", path)
            fsync_file(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``target`` to fill; on success it replaces ``target`` whole."""
    with _staging(Path(target)) as staging:
        yield staging
        _flush(staging, target)
        replace_dir(staging, target)


@contextmanager
def staged_entry(target: Path, sound: Callable[[Path], bool]) -> Iterator[Path]:
    """Like :func:`staged_dir`, for a cache entry that several processes may build at once: the
    first sound entry to appear stays (``sound`` tells), and a damaged one is replaced."""
    target = Path(target)
    with _staging(target) as staging:
        yield staging
        _flush(staging, target)
        if target.exists():
            if sound(target):
                return
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not sound(target):  # not another writer that got there first
                raise
        fsync_dir(target.parent)


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary sibling directory of ``target``, removed unless the block moved it into place."""
    with io_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _flush(staging: Path, target: Path) -> None:
    """Everything staged is on disk before the rename that publishes it."""
    fsync_tree(staging)
    faults.point("io.write", target)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (a step saved again, an export redone) is moved
    aside first, so readers see the old directory or the new one, never a mix."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{dst.name}.", dir=dst.parent))
        os.rename(dst, old / dst.name)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
    fsync_dir(dst.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_file(path)


def fsync_tree(root: Path, *, only: Callable[[Path], bool] = lambda _: True) -> None:
    """Flush the files under ``root`` (those ``only`` accepts) and their directories to disk."""
    for dirpath, _, files in os.walk(root):
        for path in [Path(dirpath) / name for name in files] + [Path(dirpath)]:
            try:
                if path.is_dir() or only(path):
                    fsync_file(path)
            except FileNotFoundError:  # another rank's temporary file, renamed while we walked
                continue


def claim_dir(
    out: Path, identity: str, text: str, *, resume: bool, overwrite: bool, keep: tuple[str, ...] = (),
    same: Callable[[str, str], bool] = str.__eq__,
) -> None:
    """Make ``out`` the directory of the job described by ``text`` (saved as ``out/identity``).

    An existing directory is continued only with ``resume`` and a ``text`` that is the ``same``
    job (then saved as the job's description from here on), replaced only
    with ``overwrite`` (its entries named in ``keep``, such as the lock, stay); anything else is
    refused, so no run is ever clobbered by accident.
    """
    out = Path(out)
    saved = out / identity
    check_output_dir(out)
    existing = [p for p in out.iterdir() if p.name not in keep] if out.is_dir() else []
    if existing:
        if resume and saved.is_file():
            before = saved.read_text()
            if not same(before, text):
                raise CptError(
                    f"the new {identity} differs from the one this run was started with ({saved}); resume with the same "
                    "recipe and --set overrides, or choose another output directory",
                    str(out),
                )
            if before != text:
                write_text(saved, text)
            return
        if overwrite:
            with io_errors(out):
                for p in existing:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif resume:
            raise CptError(f"not a cpt job directory (no {identity}); nothing to resume", str(out))
        else:
            raise CptError("already exists; pass --resume to continue it or --overwrite to replace it", str(out))
    with io_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    write_text(saved, text)
