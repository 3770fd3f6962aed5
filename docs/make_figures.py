"""Regenerate the figures in docs/img/ with cpt's own drawing code: `python docs/make_figures.py`.

Each figure is what a command shown in the docs draws: `cpt plan --png` on the quickstart recipe
with the `--set` overrides that the page shows, and `cpt fit --png` on the Chinchilla table in
shared/. That takes under a minute offline once the quickstart's data are in cpt's cache.

`--run DIR` also redraws the figures of a trained quickstart with `cpt report`: it trains the
quickstart into DIR first unless DIR holds a finished run (a few minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from cpt.cli import main

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
CHINCHILLA = ROOT.parent / "shared" / "data" / "chinchilla_svg_extracted.csv"

# figure name -> `--set` overrides of the quickstart recipe (the pages show the same commands)
PLANS: dict[str, list[str]] = {
    "quickstart-plan": [],
    "rewarm-cosine": ["stages.cpt.schedule={type: cosine, lr: 1.0e-3, warmup: 0.01}"],
    "schedule-wsd-s": ["stages.cpt.schedule={type: wsd-s, lr: 1.0e-3, warmup: 0.02, period: 50, decay: 0.2}"],
    "schedule-infinite": ["stages.cpt.schedule={type: infinite, lr: 1.0e-3, const_lr: 5.0e-4, min_lr: 5.0e-5}"],
    "upsampling": [
        ("stages.cpt.mixture={weights: {code: 3, prose: 1},"
         " phases: [{until: 0.8}, {until: 1.0, weights: {code: 1, prose: 1}}]}")
    ],
}

FITS: dict[str, list[str]] = {
    "chinchilla-fit": [str(CHINCHILLA), "--law", "chinchilla", "--col", "params=Model Size",
                       "--tokens-from-flops", "Training FLOP", "--drop-highest", "5", "--bootstrap", "0"],
}


def _cpt(argv: list[str]) -> None:
    print("cpt", " ".join(argv), flush=True)
    code = main(argv)
    if code:
        sys.exit(code)


# figure name -> the file of `cpt report` on a finished quickstart run
REPORTS: dict[str, str] = {"quickstart-delta": "delta.png"}


def make_figures(run_dir: Path | None) -> None:
    for name, overrides in PLANS.items():
        _cpt(["plan", str(QUICKSTART), "--png", str(IMG / f"{name}.png"), *(f"--set={o}" for o in overrides)])
    for name, args in FITS.items():
        _cpt(["fit", *args, "--png", str(IMG / f"{name}.png")])
    if run_dir is None:
        return
    if not (run_dir / "cpt" / "final").is_dir():
        _cpt(["run", str(QUICKSTART), "--output-dir", str(run_dir), "--resume"])
    with tempfile.TemporaryDirectory() as out:
        _cpt(["report", str(run_dir), "--out", out])
        for name, drawn in REPORTS.items():
            shutil.copyfile(Path(out) / drawn, IMG / f"{name}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, metavar="DIR", help="a quickstart run to draw (trained if unfinished)")
    make_figures(parser.parse_args().run)
