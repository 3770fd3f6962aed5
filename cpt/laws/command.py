"""`cpt fit`: fit a scaling law to a table of losses, or find the critical mixture ratio of a sweep."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cpt.errors import CptError
from cpt.io import write_text
from cpt.laws.options import LAWS, FitOptions
from cpt.paths import check_output_file

CMR_FLAGS = ("baseline_general_loss", "epsilon", "relative_tolerance", "write_mixture", "at_tokens")


def add_fit_parser(commands) -> argparse.ArgumentParser:
    """Add `cpt fit` to the sub-parsers of the `cpt` command."""
    text = "Fit a scaling law to a table of losses, or find the critical mixture ratio of a sweep."
    fit = commands.add_parser("fit", help=text, description=text)
    fit.add_argument("table", type=Path, metavar="TABLE", help="CSV file, or a sweep directory containing sweep.csv")
    fit.add_argument("--law", required=True, metavar="LAW", help=f"one of: {', '.join(LAWS)}")
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    fit.add_argument("--png", type=Path, metavar="PATH", help="also draw the data and the fitted curves")
    fit.add_argument("--predict", action="append", default=[], metavar="COL=V[,COL=V...]",
                     help="predict at this point (repeatable); for cmr: tokens=T gives the CMR at T")
    fit.add_argument("--col", action="append", default=[], metavar="NAME=COLUMN",
                     help="read the law's column NAME from the table's COLUMN (repeatable)")
    fit.add_argument("--tokens-from-flops", metavar="COLUMN", help="derive tokens D = C / (6 N) from a FLOP column")
    fit.add_argument("--drop-highest", type=int, default=0, metavar="K", help="leave out the K highest-loss rows")
    fit.add_argument("--huber-delta", type=float, default=FitOptions.huber_delta, metavar="DELTA",
                     help="Huber delta, on log losses for log-space laws, on losses otherwise (default: %(default)g)")
    fit.add_argument("--bootstrap", type=int, default=FitOptions.bootstrap, metavar="N",
                     help="bootstrap resamples for 95%% intervals, 0 for none (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=FitOptions.seed, help="seed of the bootstrap (default: %(default)s)")
    fit.add_argument("--lbfgs-starts", type=int, default=FitOptions.refine, metavar="K",
                     help="L-BFGS-B runs from the K best points of the start grid (default: %(default)s)")
    cmr = fit.add_argument_group("critical mixture ratio (--law cmr)")
    cmr.add_argument(
        "--baseline-general-loss", type=float, metavar="X",
        help="the base model's general loss (default: the table's base_general_loss column, as cpt sweep writes it)",
    )
    tol = cmr.add_mutually_exclusive_group()
    tol.add_argument("--epsilon", type=float, metavar="E", help="absolute tolerance: limit X + E (default 0.05)")
    tol.add_argument("--relative-tolerance", type=float, metavar="P", help="relative tolerance: limit X * (1 + P)")
    cmr.add_argument("--write-mixture", type=Path, metavar="PATH",
                     help="write a mixture YAML (replay: 1 - CMR), e.g. data_mixtures/finance-cmr.yaml")
    cmr.add_argument("--at-tokens", type=float, metavar="T",
                     help="token budget for --write-mixture (default: the largest measured)")
    return fit


def _options(args: argparse.Namespace) -> FitOptions:
    if not (math.isfinite(args.huber_delta) and args.huber_delta > 0):
        raise CptError(f"--huber-delta must be > 0, got {args.huber_delta}", "fit")
    if args.bootstrap < 0 or args.lbfgs_starts < 1 or args.drop_highest < 0:
        raise CptError("--bootstrap and --drop-highest must be >= 0, --lbfgs-starts >= 1", "fit")
    return FitOptions(huber_delta=args.huber_delta, refine=args.lbfgs_starts, bootstrap=args.bootstrap, seed=args.seed)


def _points(texts: list[str]) -> list[dict[str, float]]:
    """``--predict COL=V,COL=V`` arguments as dictionaries."""
    out = []
    for text in texts:
        point = {}
        for pair in text.split(","):
            name, sep, value = pair.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not sep or not name.strip() or not math.isfinite(number):
                raise CptError(f"--predict expects COL=V[,COL=V...] with finite numbers, got {text!r}", "fit")
            point[name.strip()] = number
        out.append(point)
    return out


def _print_text(report: dict, source: Path) -> None:
    print(f"{report['law']} on {report['rows']} rows of {source} (Huber delta {report['huber_delta']:g}, "
          f"{report['bootstrap']} bootstrap resamples)")
    for name, value in report["params"].items():
        lo_hi = report["ci"].get(name)
        interval = f"   95% CI [{lo_hi[0]:.6g}, {lo_hi[1]:.6g}]" if lo_hi else ""
        print(f"  {name} = {value!r}{interval}")
    if report["r2"] is not None or report["mse"] is not None:
        print(f"  r2 {report['r2']!r}  mse {report['mse']!r}  loo_error {report['loo_error']!r}  "
              f"huber {report['huber']!r}")
    cmr = report.get("cmr")
    if cmr:
        tol = cmr["tolerance"]
        print(f"  critical mixture ratio ({cmr['method']}, {tol['kind']} tolerance {tol['value']!r}, "
              f"limit {tol['limit']!r}):")
        for entry in cmr["per_tokens"]:
            print(f"    {entry['tokens']:.6g} tokens: R = {entry['ratio']!r}")
    for entry in report["predictions"]:
        inputs = ", ".join(f"{k}={v:g}" for k, v in entry.items() if k not in ("value", "output"))
        output = f" {entry['output']}" if "output" in entry else ""
        print(f"  predict {inputs}:{output} {entry['value']!r}")


def _baseline(given: float | None, table) -> float | None:
    """The flag, else the base model's general loss that `cpt sweep` writes into every row."""
    if given is not None or not table.has("base_general_loss"):
        return given
    values = set(table.column("base_general_loss").tolist())
    if len(values) != 1:
        raise CptError("the table's base_general_loss differs between rows; give --baseline-general-loss", str(table.path))
    return values.pop()


def cmd_fit(args: argparse.Namespace) -> int:
    law = args.law
    if law not in LAWS:
        raise CptError(f"unknown law {law!r}; laws: {', '.join(LAWS)}", "fit")
    if law != "cmr":
        given = [f"--{f.replace('_', '-')}" for f in CMR_FLAGS if getattr(args, f) is not None]
        if given:
            raise CptError(f"{', '.join(given)}: only for --law cmr", "fit")
    elif args.tokens_from_flops or args.drop_highest:
        raise CptError("--tokens-from-flops and --drop-highest do not apply to --law cmr", "fit")
    if args.at_tokens is not None and args.write_mixture is None:
        raise CptError("--at-tokens chooses the budget of --write-mixture; give --write-mixture too", "fit")
    options = _options(args)
    points = _points(args.predict)
    for flag, path in (("--png", args.png), ("--write-mixture", args.write_mixture)):
        if path:
            check_output_file(path, flag)

    # numpy, scipy and the fitting modules load only when `cpt fit` runs, not for every `cpt` command.
    from cpt.laws import plot
    from cpt.laws.cmr import mixture_text, tolerance
    from cpt.laws.problems import check_renames
    from cpt.laws.report import cmr_report, law_report
    from cpt.laws.table import parse_renames, read_table

    renames = parse_renames(args.col)
    check_renames(law, renames)
    table = read_table(args.table, renames)
    if law == "cmr":
        tol = tolerance(_baseline(args.baseline_general_loss, table), args.epsilon, args.relative_tolerance)
        report, result = cmr_report(table, tol, options, points)
        if args.write_mixture:
            Path(args.write_mixture).parent.mkdir(parents=True, exist_ok=True)
            write_text(args.write_mixture, mixture_text(report, args.at_tokens, table.path))
        if args.png:
            plot.write_cmr_png(result, args.png)
    else:
        report, fits = law_report(law, table, options, points, args.tokens_from_flops, args.drop_highest)
        if args.png:
            plot.write_fit_png(law, fits, args.png)

    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        _print_text(report, table.path)
        for path in (args.png, args.write_mixture):
            if path:
                print(f"wrote {path}")
    return 0
