"""Scaling-law fit speed: the Chinchilla table fitted from a 4,500-point start grid vs from single starts.

The grid (Besiroglu et al. 2024's) is scored in one vectorised call and L-BFGS-B runs from its best
few points. For comparison, L-BFGS-B runs from --sample random points of the same grid one at a
time: their median time is the single-start time, and the share of them that reach the grid fit's
optimum says how often one start alone would have been enough. Same data for all:
../shared/data/chinchilla_svg_extracted.csv without its five highest-loss points, D = C / (6 N).
Last line is JSON:
{"grid_starts": G, "grid_seconds": s, "single_start_seconds": s, "single_start_success": f, "E": ...}

    python benchmarks/fit_speed.py [--repeats 3] [--lbfgs-starts 10] [--sample 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cpt.laws.fitting import fit_form, minimize_from, objective, target
from cpt.laws.forms import CHINCHILLA
from cpt.laws.options import FitOptions
from cpt.laws.problems import problems
from cpt.laws.table import read_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chinchilla_svg_extracted.csv"


def best_of(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lbfgs-starts", type=int, default=FitOptions.refine)
    parser.add_argument("--sample", type=int, default=200, help="single starts to time")
    args = parser.parse_args()

    table = read_table(DATA, {"params": "Model Size"})
    (problem,) = problems("chinchilla", table, tokens_from_flops="Training FLOP", drop_highest=5)
    X, y, delta = problem.X, problem.y, FitOptions.huber_delta
    y_target = target(CHINCHILLA, y)
    grid = CHINCHILLA.starts(X, y)

    grid_s, (theta, value) = best_of(lambda: fit_form(CHINCHILLA, X, y, delta, args.lbfgs_starts), args.repeats)
    score_s, _ = best_of(lambda: objective(CHINCHILLA, grid, X, y_target, delta), args.repeats)
    single_times, single_values = [], []
    for i in np.random.default_rng(0).choice(len(grid), args.sample, replace=False):
        t0 = time.perf_counter()
        _, single_value = minimize_from(CHINCHILLA, grid[i], X, y_target, delta)
        single_times.append(time.perf_counter() - t0)
        single_values.append(single_value)
    single_s = float(np.median(single_times))
    success = float(np.mean(np.array(single_values) <= value * (1 + 1e-6)))
    params = dict(zip(CHINCHILLA.params, map(float, CHINCHILLA.natural(theta))))
    print(f"Chinchilla table: {len(y)} points; start grid of {len(grid)} points")
    print(f"  score the whole grid (one vectorised call)    {score_s * 1e3:8.1f} ms")
    print(f"  grid + L-BFGS-B from the best {args.lbfgs_starts:<3d}            {grid_s:8.3f} s   Huber {value:.10g}")
    print("    " + "  ".join(f"{k} = {v!r}" for k, v in params.items()))
    print(f"  one L-BFGS-B run from a grid point (median)   {single_s:8.3f} s   reaches that optimum from "
          f"{success:.0%} of {args.sample} random grid points")
    print(json.dumps({
        "grid_starts": len(grid), "lbfgs_starts": args.lbfgs_starts, "grid_seconds": round(grid_s, 3),
        "grid_score_seconds": round(score_s, 4), "single_start_seconds": round(single_s, 4),
        "single_start_success": success, "huber": value, **params,
    }))


if __name__ == "__main__":
    main()
