"""What a user chooses for `cpt fit`: the law and the fit's settings.

Kept free of numpy and scipy so that building the `cpt` command line stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

LAWS = ("chinchilla", "ratio-power", "dcpt", "mixing", "cmr")


@dataclass(frozen=True)
class FitOptions:
    huber_delta: float = 1e-3  # on log losses for log-space forms, on losses otherwise
    refine: int = 10  # L-BFGS-B runs, from the best-scoring starts of the grid
    bootstrap: int = 200  # resamples for confidence intervals (0: none)
    seed: int = 0
