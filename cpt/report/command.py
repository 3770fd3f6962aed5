"""`cpt report RUN_DIR` and `cpt compare RUN_DIR...`: figures, an HTML page and a Markdown table."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpt.errors import CptError
from cpt.paths import check_output_dir

COMPARE_DEFAULT_OUT = Path("cpt-compare")


def add_report_parsers(commands) -> None:
    """Add `report` and `compare` to the CLI's sub-parsers."""
    text = "Plot a run (loss, deltas, lr and mixture, harness) into PNGs, an HTML page and a Markdown table."
    report = commands.add_parser("report", help=text, description=text)
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `cpt run`")
    report.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: RUN_DIR/report)")
    text = "Overlay several runs (for example different replay ratios) in the same figures and table."
    compare = commands.add_parser("compare", help=text, description=text)
    compare.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories of `cpt run`")
    compare.add_argument(
        "--out", type=Path, default=COMPARE_DEFAULT_OUT, metavar="DIR",
        help=f"output directory (default: ./{COMPARE_DEFAULT_OUT})",
    )


def cmd_report(args: argparse.Namespace) -> int:
    out = args.out
    if out is None:
        out = args.run_dir / "report"
        if (out / "metrics.jsonl").exists():
            raise CptError("a stage of this run is named `report`; choose another output with --out", str(out))
    _print_written(write_report([args.run_dir], out))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    _print_written(write_report(args.run_dirs, args.out))
    return 0


def write_report(run_dirs: list[Path], out: Path) -> list[Path]:
    """Read the runs, then write the figures, summary.md and index.html into ``out``; return their paths.

    Files of other names in ``out`` are left alone; each written file replaces its old version whole.
    """
    from cpt.io import write_text
    from cpt.report.page import html_page, summary_markdown
    from cpt.report.plots import (
        harness_keys,
        plot_delta,
        plot_harness,
        plot_loss,
        plot_lr_mixture,
    )
    from cpt.report.runs import load_runs
    from cpt.report.summary import table_rows

    runs = load_runs([Path(p) for p in run_dirs])
    _make_out_dir(Path(out))
    figures = [
        ("loss.png", plot_loss, "Held-out loss per domain over tokens, with each stage's base as a dashed reference"),
        ("delta.png", plot_delta, "Loss change from each stage's base per domain (above 0: worse than the base)"),
        ("lr_mixture.png", plot_lr_mixture, "Learning rate and realized data mixture over tokens"),
    ]
    if harness_keys(runs):
        figures.append(("harness.png", plot_harness, "Harness metrics over tokens"))
    for name, plot, _ in figures:
        plot(runs, out / name)
    labels = ", ".join(run.label for run in runs)
    title = f"cpt {'compare' if len(runs) > 1 else 'report'}: {labels}"
    rows = table_rows(runs)
    write_text(out / "summary.md", summary_markdown(title, rows))
    write_text(out / "index.html", html_page(title, [run.path for run in runs], rows, [(n, c) for n, _, c in figures]))
    return [out / name for name, _, _ in figures] + [out / "summary.md", out / "index.html"]


def _make_out_dir(out: Path) -> None:
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CptError(f"cannot create the output directory: {exc.strerror}", str(out)) from None


def _print_written(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")
