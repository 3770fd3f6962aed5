"""Tables of measured losses: CSV files (or a sweep directory's sweep.csv) read into numeric columns.

A law asks for columns by canonical name (``params``, ``tokens``, ``loss`` ...); ``--col
name=column`` says which CSV column holds one. Only the columns a law uses are parsed, so a
table may carry any other columns (run names, colours); every used cell must be a finite number.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt.errors import CptError
from cpt.paths import read_text

SWEEP_FILE = "sweep.csv"


@dataclass(frozen=True)
class Table:
    path: Path
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    lines: tuple[int, ...]  # line of each row in the file, for error messages
    renames: dict[str, str]  # canonical name -> CSV column

    def __len__(self) -> int:
        return len(self.rows)

    def source(self, name: str) -> str:
        """The CSV column that holds the canonical column `name`."""
        return self.renames.get(name, name)

    def has(self, name: str) -> bool:
        return self.source(name) in self.header

    def column(self, name: str) -> np.ndarray:
        """A canonical column as floats; a missing column or a cell that is not a finite number is an error."""
        source = self.source(name)
        if source not in self.header:
            renamed = f" (from --col {name}={source})" if name in self.renames else ""
            raise CptError(
                f"no column {source!r}{renamed}; columns: {', '.join(self.header)} "
                f"(map another column with --col {name}=COLUMN)",
                str(self.path),
            )
        index = self.header.index(source)
        out = np.empty(len(self.rows))
        for i, (row, line) in enumerate(zip(self.rows, self.lines)):
            cell = row[index].strip() if index < len(row) else ""
            try:
                out[i] = float(cell)
            except ValueError:
                out[i] = math.nan
            if not math.isfinite(out[i]):
                raise CptError(f"column {source!r}, line {line}: {cell!r} is not a finite number", str(self.path))
        return out

    def columns(self, names: Iterable[str]) -> np.ndarray:
        """Several canonical columns stacked as (rows, len(names))."""
        return np.stack([self.column(n) for n in names], axis=1)


def parse_renames(pairs: Sequence[str]) -> dict[str, str]:
    """``--col name=column`` arguments as {canonical name: CSV column}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name.strip() or not column:
            raise CptError(f"--col expects name=column, got {pair!r}", "fit")
        out[name.strip()] = column
    return out


def read_table(path: Path, renames: dict[str, str]) -> Table:
    """Read a CSV, or the sweep.csv inside a sweep directory."""
    file = path / SWEEP_FILE if path.is_dir() else path
    if not file.exists():
        detail = f"a directory without {SWEEP_FILE}" if path.is_dir() else "no such file"
        raise CptError(f"{detail}; expected a CSV table or a sweep directory", str(path))
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
    header = tuple(h.strip() for h in next(reader, ()))
    numbered = [(tuple(r), reader.line_num) for r in reader if any(cell.strip() for cell in r)]
    if not header:
        raise CptError("empty table (no header)", str(file))
    rows, lines = (tuple(x) for x in zip(*numbered)) if numbered else ((), ())
    missing = sorted(c for c in set(renames.values()) if c not in header)
    if missing:
        raise CptError(f"--col names columns that do not exist: {', '.join(missing)}; columns: {', '.join(header)}",
                       str(file))
    return Table(file, header, rows, lines, renames)
