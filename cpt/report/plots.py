"""The report's figures: every run on one cumulative token axis, one colour per run.

Figures are built with matplotlib's object API (no pyplot), so drawing touches no global backend
state and nothing needs closing. Each PNG is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter
from matplotlib.transforms import blended_transform_factory

from cpt.io import write_with
from cpt.report.runs import RunData, StageData, as_float, ordered_union
from cpt.report.series import mixture_shares, rolling_mean, smoothing_window

PANEL_COLUMNS = 3
PANEL_SIZE = (5.0, 3.2)
EVAL = {"marker": "o", "ms": 3, "lw": 1.5}
EMA = {"ls": (0, (2, 2)), "lw": 1.5}
TRAIN = {"alpha": 0.3, "lw": 1}
BASE = {"ls": (0, (6, 4)), "lw": 1, "alpha": 0.7}


def run_colour(index: int) -> str:
    return f"C{index % 10}"


def plot_loss(runs: list[RunData], path: Path) -> None:
    """Per domain: held-out loss, smoothed training loss behind it, and each stage's base as a reference."""
    domains = ordered_union(run.domains for run in runs)
    fig, axes = _panels(len(domains))
    ema = False
    for ax, domain in zip(axes, domains):
        for i, run in enumerate(runs):
            for stage in run.stages:
                x, y = stage.series(f"loss/{domain}")
                ax.plot(x, rolling_mean(y, smoothing_window(len(y))), color=run_colour(i), **TRAIN)
                base = _stage_base(stage, domain)
                ax.plot([stage.offset, stage.offset + stage.final_tokens], [base, base], color=run_colour(i), **BASE)
                ema |= _eval_curves(ax, stage, f"eval/{domain}/loss", run_colour(i))
        _decorate(ax, runs, f"{domain}: loss", "loss")
    styles = [(EVAL, "held-out eval loss"), (TRAIN, "training loss (rolling mean)"),
              (BASE, "base: the stage's step-0 eval")]
    _finish(fig, path, _style_key(styles, ema) + _run_handles(runs))


def plot_delta(runs: list[RunData], path: Path) -> None:
    """Per domain: eval loss minus the stage's base (above 0 = worse than where the stage started)."""
    domains = ordered_union(run.domains for run in runs)
    fig, axes = _panels(len(domains), sharey=True)
    ema = False
    for ax, domain in zip(axes, domains):
        ax.axhline(0.0, color="black", lw=0.8)
        for i, run in enumerate(runs):
            for stage in run.stages:
                ema |= _eval_curves(ax, stage, f"delta/{domain}", run_colour(i))
        _decorate(ax, runs, f"{domain}: loss - stage base", "delta loss")
    _finish(fig, path, _style_key([(EVAL, "delta of the eval loss")], ema) + _run_handles(runs))


def plot_lr_mixture(runs: list[RunData], path: Path) -> None:
    """The lr of every run on top; below, one stacked area per run of the realized mixture."""
    fig = Figure(figsize=(2 * PANEL_SIZE[0], PANEL_SIZE[1] * (1 + len(runs))), layout="constrained")
    axes = fig.subplots(1 + len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for i, run in enumerate(runs):
        for stage in run.stages:
            axes[0].plot(*stage.series("lr"), color=run_colour(i), lw=1.5)
    _decorate(axes[0], runs, "learning rate", "lr", xlabel=False)
    domains = ordered_union(stage.keys("tokens/") for run in runs for stage in run.stages)
    colours = colormaps["Set2"].colors  # not the run colours: here colour means domain
    palette = {d: colours[j % len(colours)] for j, d in enumerate(domains)}
    for ax, run in zip(axes[1:], runs):
        for stage in run.stages:
            names = stage.keys("tokens/")
            if not names:
                continue
            cumulative = np.array([[as_float(r.get(f"tokens/{d}")) for d in names] for r in stage.train])
            shares = mixture_shares(cumulative)
            # each share covers the tokens since the previous record: draw it back to the stage's start
            x = np.array([stage.offset] + [stage.offset + int(r["tokens"]) for r in stage.train])
            ax.stackplot(x, np.vstack([shares[:1], shares]).T, colors=[palette[d] for d in names], step="pre",
                         alpha=0.85)
        ax.set_ylim(0, 1)
        _decorate(ax, [run], f"{run.label}: realized mixture (share of the tokens since the previous record)",
                  "share", xlabel=ax is axes[-1])
    _finish(fig, path, _run_handles(runs) + [Patch(color=palette[d], label=d) for d in domains])


def harness_keys(runs: list[RunData]) -> list[str]:
    return ordered_union(stage.keys("harness/", evals=True) for run in runs for stage in run.stages)


def plot_harness(runs: list[RunData], path: Path) -> None:
    """Each harness task/metric over tokens."""
    keys = harness_keys(runs)
    fig, axes = _panels(len(keys))
    ema = False
    for ax, key in zip(axes, keys):
        for i, run in enumerate(runs):
            for stage in run.stages:
                ema |= _eval_curves(ax, stage, f"harness/{key}", run_colour(i))
        _decorate(ax, runs, key, key.rsplit("/", 1)[-1])
    _finish(fig, path, _style_key([(EVAL, "harness score")], ema) + _run_handles(runs))


# ----------------------------------------------------------------------------- shared pieces


def _stage_base(stage: StageData, domain: str) -> float:
    """The step-0 eval of the stage; summary.json's base_loss if that record is missing."""
    key = f"eval/{domain}/loss"
    for record in stage.evals:
        if record.get("step") == 0 and key in record:
            return as_float(record[key])
    base = ((stage.summary or {}).get("domains") or {}).get(domain, {}).get("base_loss")
    return math.nan if base is None else float(base)


def _panels(n: int, sharey: bool = False):
    n = max(n, 1)
    cols = min(n, PANEL_COLUMNS)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _decorate(ax, runs: list[RunData], title: str, ylabel: str, xlabel: bool = True) -> None:
    """Title, labels, token ticks, and a dotted line named after each stage where it starts."""
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel("tokens (cumulative over stages)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.2)
    at_top = blended_transform_factory(ax.transData, ax.transAxes)
    for offset, name in dict.fromkeys((s.offset, s.name) for run in runs for s in run.stages):
        ax.axvline(offset, color="0.45", ls=":", lw=1)
        ax.text(offset, 0.98, name, transform=at_top, rotation=90, va="top", ha="left", fontsize=7, color="0.25",
                zorder=5, bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1})


def _eval_curves(ax, stage: StageData, key: str, colour: str) -> bool:
    """The eval series ``key`` and, when logged, the same for the EMA weights (dashed); True if there was one."""
    ax.plot(*stage.series(key, evals=True), color=colour, **EVAL)
    x, y = stage.series(f"ema/{key}", evals=True)
    if x.size:
        ax.plot(x, y, color=colour, **EMA)
    return bool(x.size)


def _style_key(styles: list[tuple[dict, str]], ema: bool) -> list:
    """What each line style means (grey: the colours mean runs)."""
    styles = styles + ([(EMA, "EMA weights")] if ema else [])
    return [Line2D([], [], color="0.3", label=label, **style) for style, label in styles]


def _run_handles(runs: list[RunData]) -> list:
    """One colour per run; a single run needs no key."""
    if len(runs) < 2:
        return []
    return [Line2D([], [], color=run_colour(i), lw=2.5, label=run.label) for i, run in enumerate(runs)]


def _finish(fig: Figure, path: Path, handles: list) -> None:
    """Key above the panels, then write the PNG through a temporary file."""
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
