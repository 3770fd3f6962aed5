"""What each law fits: its forms and the table rows each form is fitted on, checked before fitting.

Columns by law (canonical names; ``--col name=column`` maps other CSV headers onto them):
- chinchilla: params (N), tokens (D), loss
- ratio-power: ratio, loss
- dcpt: params, tokens, ratio, loss
- mixing: every ``r_<domain>`` column is a domain proportion, every ``loss`` or ``<name>_loss``
  column a validation loss; one law per loss column. When the proportions sum to 1 on every
  row, the last one is the reference domain: its exponent t is fixed at 0 and left out, because
  otherwise adding a constant to every t and dividing k by its exponential gives the same law.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpt.errors import CptError
from cpt.laws.forms import CHINCHILLA, DCPT, RATIO_POWER, Array, Form, mixing_form
from cpt.laws.table import Table

SINGLE = {"chinchilla": CHINCHILLA, "ratio-power": RATIO_POWER, "dcpt": DCPT}
POSITIVE = ("params", "tokens", "ratio")  # inputs taken to powers or logs
COLUMNS = {
    "chinchilla": ("params", "tokens", "loss"),
    "ratio-power": ("ratio", "loss"),
    "dcpt": ("params", "tokens", "ratio", "loss"),
    "cmr": ("ratio", "tokens", "general_loss", "domain_loss"),
}


@dataclass(frozen=True)
class Problem:
    form: Form
    X: Array
    y: Array
    output: str  # the loss column
    ignored: tuple[str, ...] = ()  # columns the law leaves out (mixing's reference proportion)


def _canonical_columns(table: Table) -> list[str]:
    """Column names as the laws see them: renamed columns under their canonical names."""
    sources = set(table.renames.values())
    return [h for h in table.header if h not in sources] + [n for n in table.renames if n not in table.header]


def _is_loss(name: str) -> bool:
    return name == "loss" or name.endswith("_loss")


def _check_rows(form: Form, y: Array, where: str) -> None:
    need = len(form.params) + 1
    if len(y) < need:
        raise CptError(f"{form.name} has {len(form.params)} parameters and needs at least {need} rows, got {len(y)}",
                       where)


def _single(law: str, table: Table, tokens_from_flops: str | None, drop_highest: int) -> Problem:
    form, where = SINGLE[law], str(table.path)
    columns = {name: table.column(name) for name in form.inputs if name != "tokens" or not tokens_from_flops}
    if tokens_from_flops:
        flops = table.column(tokens_from_flops)
        columns["tokens"] = flops / (6 * columns["params"])  # C = 6 N D
    for name in form.inputs:
        if name in POSITIVE and np.any(columns[name] <= 0):
            raise CptError(f"column {table.source(name)!r}: {form.name} needs {name} > 0", where)
    y = table.column("loss")
    if form.log_space and np.any(y <= 0):
        raise CptError(f"column {table.source('loss')!r}: losses must be > 0", where)
    keep = np.sort(np.argsort(y, kind="stable")[: len(y) - drop_highest])
    X = np.stack([columns[name] for name in form.inputs], axis=1)[keep]
    problem = Problem(form, X, y[keep], "loss")
    _check_rows(form, problem.y, where)
    return problem


def _mixing(table: Table) -> list[Problem]:
    where = str(table.path)
    names = _canonical_columns(table)
    proportions = [n for n in names if n.startswith("r_")]
    outputs = [n for n in names if _is_loss(n)]
    if not proportions or not outputs:
        raise CptError(
            "mixing needs proportion columns named r_<domain> and loss columns named loss or <name>_loss; "
            f"columns: {', '.join(table.header)} (rename with --col r_web=COLUMN)",
            where,
        )
    X = table.columns(proportions)
    if np.any(X < 0):
        raise CptError("domain proportions must be >= 0", where)
    ignored = ()
    if len(proportions) > 1 and np.allclose(X.sum(axis=1), 1.0, atol=1e-6):
        proportions, ignored, X = proportions[:-1], (proportions[-1],), X[:, :-1]
    out = []
    for output in outputs:
        y = table.column(output)
        if np.any(y <= 0):
            raise CptError(f"column {table.source(output)!r}: losses must be > 0", where)
        problem = Problem(mixing_form(tuple(proportions), output), X, y, output, ignored)
        _check_rows(problem.form, y, where)
        out.append(problem)
    return out


def check_renames(law: str, renames: dict[str, str]) -> None:
    """Every ``--col NAME=...`` must name a column the law reads (a typo would otherwise go unnoticed)."""
    for name in renames:
        known = name.startswith("r_") or _is_loss(name) if law == "mixing" else name in COLUMNS.get(law, ())
        if not known:
            expected = "r_<domain> or <name>_loss" if law == "mixing" else ", ".join(COLUMNS[law])
            raise CptError(f"--col {name}=...: {law} has no column {name!r} (its columns: {expected})", "fit")


def problems(law: str, table: Table, tokens_from_flops: str | None = None, drop_highest: int = 0) -> list[Problem]:
    """The fitting problems of `law` (not cmr, which has its own pipeline) on `table`."""
    where = str(table.path)
    if tokens_from_flops and law not in ("chinchilla", "dcpt"):
        raise CptError(f"--tokens-from-flops needs a law with params and tokens (chinchilla, dcpt), not {law}", "fit")
    if tokens_from_flops and "tokens" in table.renames:
        raise CptError("give tokens either with --col tokens=... or with --tokens-from-flops, not both", "fit")
    if law == "mixing":
        if drop_highest:
            raise CptError("--drop-highest needs a law with a single loss column", "fit")
        return _mixing(table)
    if not 0 <= drop_highest < len(table):
        raise CptError(f"--drop-highest must be in [0, {len(table)}), got {drop_highest}", where)
    return [_single(law, table, tokens_from_flops, drop_highest)]
