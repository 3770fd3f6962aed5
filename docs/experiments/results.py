"""Three classic continual pre-training experiments on a CPU, written up as docs/results.md.

1. Replay 0/5/25/50% (Ibrahim et al. 2024): the quickstart's code stage at four replay shares,
   from one shared base model (`cpt sweep --keep-schedule`, ratio = 1 - replay).
2. Infinite vs repeated cosine over two successive domains (library code, then the test suite;
   Ibrahim et al. 2024, Singh et al. 2025).
3. An end-of-run upsampling window of 0/10/20% (Blakeney et al. 2024).
4. MeCo, metadata conditioning then cooldown, against standard training at equal tokens
   (Gao et al. 2025, recipes/meco.yaml).

Every step is a `cpt` command, printed before it runs and listed on the page.

    python docs/experiments/results.py [--out runs/results]   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from commands import Commands  # beside this script
from real_model import HEADING as REAL_MODEL  # section 5, which real_model.py writes

from cpt.train.metrics import read_metrics, train_records

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
REPLAYS = [0.0, 0.05, 0.25, 0.5]
WINDOWS = [0.0, 0.1, 0.2]
ANNEAL_STEPS = 30  # the release decay of the infinite schedule's first domain
SCHEDULES = {
    "repeated cosine": [
        "stages.code.schedule={type: cosine, lr: 1.0e-3, warmup: 0.02, min_lr: 1.0e-4}",
        "stages.tests.schedule={type: cosine, lr: 1.0e-3, warmup: 0.02, min_lr: 1.0e-4}",
    ],
    # warmup and cooldown once; the main branch stays at the constant lr through the first domain,
    # the second starts at that constant and anneals at its end (Ibrahim et al. 2024)
    "infinite": [
        "stages.code.schedule={type: infinite, lr: 1.0e-3, const_lr: 5.0e-4, min_lr: 1.0e-4, warmup: 0.02, "
        "cooldown: 0.1, anneal: 0}",
        "stages.tests.schedule={type: infinite, lr: 5.0e-4, const_lr: 5.0e-4, min_lr: 1.0e-4, warmup: 0, "
        "cooldown: 0, anneal: 0.2}",
        f"stages.code.checkpoint={{every: {150 - ANNEAL_STEPS}, keep: null}}",
    ],
}


def meco_note(finals: dict[str, dict], metadata_share: float) -> str:
    """What the paper saw, what this run saw, and what a run of this size can and cannot show."""
    gap = {d: finals["MeCo"][d]["final_loss"] - finals["standard"][d]["final_loss"] for d in ("prose", "code")}
    return (
        "What the paper saw: a 1.6B model with MeCo matched the standard model's average downstream accuracy "
        "with 33% less training data, and the gain held from 600M to 8B parameters with a 10-20% cooldown. "
        f"What this run saw: metadata took {metadata_share:.1%} of MeCo's training tokens (context, never "
        f"targets), and at equal tokens MeCo ends {gap['prose']:+.3f} (prose) and {gap['code']:+.3f} (code) in "
        "held-out loss against the standard run. What this scale can show is that the mechanics hold: "
        "metadata in every conditioning block and in none of the cooldown's, never a target, held-out loss "
        "always on plain text (the tests check each). What it cannot show is the acceleration. MeCo's gain "
        "comes from many documents sharing a source, over billions of tokens; here nearly every document "
        "has a tag of its own (a module path, a topic), there are a few thousand documents and 600k tokens, "
        "so the tags carry little the model can reuse, and the paper's effect is not expected to appear."
    )


def metadata_share() -> float:
    """Share of the MeCo stage's training-block tokens that are metadata (loss-masked), over its domains."""
    from cpt.config.load import load_recipe
    from cpt.plan import plan_recipe

    (plan,) = plan_recipe(load_recipe(ROOT / "recipes" / "meco.yaml"))
    stats = [plan.blocks[d].stats for d in plan.conditioned()]
    return sum(s.n_masked for s in stats) / sum(s.n_blocks * s.seq_len for s in stats)


def summary(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "summary.json").read_text())


def upsampling_mixture(window: float) -> str:
    """The `--set` of a run whose last `window` of steps raises the small domain to half of each batch."""
    steady = "{code: 0.8, tests: 0.1, prose: 0.1}"
    if not window:
        return f"stages.cpt.mixture={{weights: {steady}}}"
    return (f"stages.cpt.mixture={{phases: [{{until: {1 - window:g}, weights: {steady}}}, "
            "{until: 1.0, weights: {code: 0.4, tests: 0.5, prose: 0.1}}]}")


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/results"))
    args = parser.parse_args()
    out = Path(os.path.relpath(args.out.resolve(), ROOT))  # the page's commands run from the repository root
    os.chdir(ROOT)
    here, img = HERE.relative_to(ROOT), ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpt = Commands()
    page = ["# Results", ""]

    # 1. replay ---------------------------------------------------------------------------------
    replay_dir = out / "replay"
    ratios = ",".join(f"{1 - r:g}" for r in REPLAYS)
    cpt("sweep", "recipes/quickstart.yaml", "--stage", "cpt", "--ratios", ratios, "--keep-schedule",
        "--output-dir", replay_dir)
    runs = [replay_dir / f"ratio-{1 - r:g}" for r in REPLAYS]
    cpt("compare", *runs, "--out", out / "compare-replay")
    shutil.copy(out / "compare-replay" / "delta.png", img / "results-replay-delta.png")
    page += [
        "## 1. Replay: how much of the old data to mix in",
        "",
        "The quickstart's `cpt` stage (Python code after English prose, WSD schedule, 409,600 tokens) "
        "at four replay shares of prose, all from the same pre-trained base model. Forgetting is the "
        "rise of held-out prose loss over the base model; adaptation the drop of held-out code loss "
        "(`summary.json` of each run). Ibrahim et al. (2024) found 5% replay enough for a weak shift "
        "and 25% for a strong one.",
        "",
        "| replay | forgetting (prose) | adaptation (code) | final prose loss | final code loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for replay, run in zip(REPLAYS, runs):
        s = summary(run, "cpt")
        page.append(f"| {replay:.0%} | {s['forgetting']:+.4f} | {s['adaptation']:+.4f} | "
                    f"{s['domains']['prose']['final_loss']:.4f} | {s['domains']['code']['final_loss']:.4f} |")
    page += ["", "![replay: deltas](img/results-replay-delta.png)", "", *cpt.block()]

    base_model = replay_dir / "base" / "pretrain" / "final"

    # 2. infinite vs repeated cosine -----------------------------------------------------------
    page += [
        "## 2. Infinite schedule vs repeated cosine over two successive domains",
        "",
        "From the same base model: library code (`builtin:python-stdlib`, 25% prose), then the "
        "standard library's test suite (`builtin:python-tests`, 25% replay), 150 steps each "
        "(`docs/experiments/two-domains.yaml`). Repeated cosine re-warms to 1e-3 and decays to 1e-4 "
        "in each stage. The infinite schedule warms up and cools down to a constant 5e-4 once and stays "
        "there through the first domain; the second domain continues at that constant and anneals to "
        "1e-4 over its last 20%. Its release model after the first domain is an anneal branch "
        f"(`cpt anneal`, {ANNEAL_STEPS} steps of 1-sqrt decay from the checkpoint {ANNEAL_STEPS} steps "
        "before the stage's end), so both schedules have trained 150 steps on the first domain when it "
        "is measured, while the second domain still starts from the un-annealed main branch.",
        "",
        "| schedule | model | prose loss | code loss | tests loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    schedule_runs = []
    for label, overrides in SCHEDULES.items():
        run = out / f"two-domains-{label.replace(' ', '-')}"
        cpt("run", here / "two-domains.yaml", "--output-dir", run, "--overwrite",
            *sets([f"stages.code.model={base_model}", *overrides]))
        schedule_runs.append(run)
        models = [("after code", run / "code"), ("after tests", run / "tests")]
        if label == "infinite":
            branch_from = f"step-{150 - ANNEAL_STEPS}"
            cpt("anneal", run / "code", "--from", branch_from, "--steps", ANNEAL_STEPS)
            models[0] = ("after code (anneal branch)", run / "code" / f"anneal-{branch_from}")
            models.insert(1, ("after code (main branch)", run / "code"))
        for what, stage_dir in models:
            d = json.loads((stage_dir / "summary.json").read_text())["domains"]
            page.append(f"| {label} | {what} | {d['prose']['final_loss']:.4f} | {d['code']['final_loss']:.4f} | "
                        f"{d['tests']['final_loss']:.4f} |")
    cpt("compare", *schedule_runs, "--out", out / "compare-schedules")
    shutil.copy(out / "compare-schedules" / "loss.png", img / "results-schedules-loss.png")
    shutil.copy(out / "compare-schedules" / "lr_mixture.png", img / "results-schedules-lr.png")
    page += ["", "![schedules: losses](img/results-schedules-loss.png)", "",
             "![schedules: lr and mixture](img/results-schedules-lr.png)", "", *cpt.block()]

    # 3. upsampling window ----------------------------------------------------------------------
    page += [
        "## 3. Upsampling a small domain at the end of the run",
        "",
        "From the same base model, 200 steps of a mixture of library code (80%), a small "
        "high-quality domain, the standard library's test suite (10%, 150 documents), and prose "
        "replay (10%), with WSD and a 20% 1-sqrt decay. In the last W of the run the small domain is "
        "raised to half of each batch, taken from the code (`docs/experiments/upsampling.yaml`; "
        "Blakeney et al. 2024 raised small domains over the last 10-20% of training).",
        "",
        "| window | tests loss | code loss | prose loss | tests tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    window_runs = []
    for window in WINDOWS:
        run = out / f"upsampling-{window:.0%}".replace("%", "pct")
        cpt("run", here / "upsampling.yaml", "--output-dir", run, "--overwrite",
            *sets([f"stages.cpt.model={base_model}", upsampling_mixture(window)]))
        window_runs.append(run)
        d = summary(run, "cpt")["domains"]
        tokens = train_records(read_metrics(run / "cpt" / "metrics.jsonl"))[-1]["tokens/tests"]
        page.append(f"| {window:.0%} | {d['tests']['final_loss']:.4f} | {d['code']['final_loss']:.4f} | "
                    f"{d['prose']['final_loss']:.4f} | {tokens:,} |")
    cpt("compare", *window_runs, "--out", out / "compare-upsampling")
    shutil.copy(out / "compare-upsampling" / "loss.png", img / "results-upsampling-loss.png")
    page += ["", "![upsampling: losses](img/results-upsampling-loss.png)", "", *cpt.block()]

    # 4. MeCo ----------------------------------------------------------------------------------
    page += [
        "## 4. Metadata conditioning then cooldown (MeCo)",
        "",
        "`recipes/meco.yaml`: the quickstart's 4-layer Llama trained from scratch for 300 steps "
        "(614,400 tokens) on the built-in prose and code, with document masking. MeCo puts each "
        "document's source before it (`URL: json/decoder.py`, `URL: <pydoc topic>`), loss-masked, for "
        "the first 90% of the steps, then cools down on plain text; the baseline is the same recipe with "
        "`metadata: false`, so both train on the same number of tokens (MeCo's metadata tokens take "
        "part of its budget). Held-out losses are measured on plain text for both, during conditioning "
        "(step 250) and at the end.",
        "",
        "| run | prose loss, step 250 | code loss, step 250 | final prose loss | final code loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    meco_runs, finals = [], {}
    for label, overrides in [("standard", ["stages.meco.mixture.metadata=false"]), ("MeCo", [])]:
        run = out / f"meco-{label.lower()}"
        cpt("run", "recipes/meco.yaml", "--output-dir", run, "--overwrite", *sets(overrides))
        meco_runs.append(run)
        evals = {r["step"]: r for r in read_metrics(run / "meco" / "metrics.jsonl") if r.get("kind") == "eval"}
        final = finals[label] = summary(run, "meco")["domains"]
        page.append(f"| {label} | {evals[250]['eval/prose/loss']:.4f} | {evals[250]['eval/code/loss']:.4f} | "
                    f"{final['prose']['final_loss']:.4f} | {final['code']['final_loss']:.4f} |")
    cpt("compare", *meco_runs, "--out", out / "compare-meco")
    shutil.copy(out / "compare-meco" / "loss.png", img / "results-meco-loss.png")
    page += ["", "![MeCo: held-out losses](img/results-meco-loss.png)", "", meco_note(finals, metadata_share()), "",
             *cpt.block()]

    page[2:2] = [
        f"Generated by `python docs/experiments/results.py` in {(time.perf_counter() - started) / 60:.0f} minutes "
        "on a 2-core CPU; every number below comes from the runs' `summary.json`, and each section lists "
        "the exact commands that made it. The models of sections 1-4 are tiny (the quickstart's 4-layer Llama) and the "
        "data small, so read the directions, not the digits; section 5 continues a real pretrained model.",
        "",
    ]
    results = ROOT / "docs" / "results.md"
    previous = results.read_text() if results.exists() else ""
    later = previous[previous.find(REAL_MODEL):] if REAL_MODEL in previous else ""  # kept as it is
    results.write_text("\n".join(page) + ("\n" + later if later else ""))
    print("wrote docs/results.md")


if __name__ == "__main__":
    main()
