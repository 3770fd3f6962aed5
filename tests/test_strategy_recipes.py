"""Every recipe in recipes/: valid as written, and planned and trained at toy scale offline.

A recipe that needs the hub (a hub model id or an ``hf:`` dataset) documents its toy run at its
top as ``# toy: FIELD=VALUE`` lines, one ``--set`` override each; these tests read them from the
file, so a new recipe is covered as soon as it is added.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpt.cli import main
from cpt.config.load import load_recipe
from cpt.config.recipe import Recipe
from cpt.train.metrics import read_metrics, train_records
from cpt.train.schedules import lr_at

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TOY = "# toy: "


def toy_overrides(path: Path) -> list[str]:
    return [line[len(TOY):] for line in header(path) if line.startswith(TOY)]


def header(path: Path) -> list[str]:
    """The comment block the recipe starts with."""
    lines = path.read_text().splitlines()
    end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return lines[:end]


def hub_names(recipe: Recipe) -> list[str]:
    """What the recipe would fetch from the hub: model and tokenizer ids, hf: datasets."""
    paths = [spec.path for s in recipe.stages for spec in (s.model, s.tokenizer) if spec is not None and spec.path]
    models = [p for p in paths if not (ROOT / p).is_dir()]
    return models + [d.source for d in recipe.domains().values() if d.source.startswith("hf:")]


def cpt(*argv):
    """Training commands run in their own process, as a user runs them."""
    return subprocess.run([sys.executable, "-m", "cpt.cli", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def cpt_here(capsys, *argv) -> tuple[int, str, str]:
    """Commands that do not train run in this process: no interpreter start-up per call."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def with_toy(path: Path) -> list[str]:
    return [f"--set={item}" for item in toy_overrides(path)]


def ids(paths):
    return [p.stem for p in paths]


TOY_RECIPES = [p for p in RECIPES if toy_overrides(p)]


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_a_recipe_that_needs_the_hub_documents_an_offline_toy_run(path):
    as_written = hub_names(load_recipe(path, check_files=False))
    if not as_written:
        pytest.skip("runs offline as written")
    assert toy_overrides(path), f"{path.name} needs {as_written} but has no '{TOY}' lines in its header"
    assert any("arXiv" in line for line in header(path)), f"{path.name} cites no paper in its header"
    assert hub_names(load_recipe(path, toy_overrides(path), check_files=False)) == []


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_as_written_only_the_unreachable_hub_stops_validation(path, capsys):
    """Offline, `cpt validate` of the recipe as written fails for hub model ids and nothing else."""
    code, _, err = cpt_here(capsys, "validate", path)
    if not hub_names(load_recipe(path, check_files=False)):
        assert code == 0, err
        return
    assert code == 2
    problems = err.strip().splitlines()
    assert problems and all("the hub is not reachable" in line for line in problems), err


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_toy_validate_and_plan(path, capsys):
    overrides = with_toy(path)
    recipe = load_recipe(path, toy_overrides(path), check_files=False)
    assert not hub_names(recipe), f"{path.name}: no toy overrides and not offline as written"
    code, _, err = cpt_here(capsys, "validate", path, *overrides)
    assert code == 0, err
    code, out, err = cpt_here(capsys, "plan", path, "--json", *overrides)
    assert code == 0, err
    plan = {s["name"]: s for s in json.loads(out)["stages"]}
    assert list(plan) == [s.name for s in recipe.stages]
    for stage in recipe.stages:
        assert plan[stage.name]["steps"] == stage.total_steps
    if path.stem != "quickstart":
        STRATEGY[path.stem](plan, recipe)  # every strategy recipe has its check


# What each strategy must look like in the plan, at any scale (the toy's plan here).


def _replay(plan, recipe):
    german = plan["german"]["weights"]
    assert all(abs(w - 0.75) < 1e-9 for w in german["german"])  # 25% replay: strong shift
    assert all(abs(w - 0.05) < 1e-9 for w in plan["web"]["weights"]["general"])  # 5%: weak shift
    for name in ("web", "german"):
        lr, schedule = plan[name]["lr"], recipe.stage(name).schedule
        assert max(lr) == pytest.approx(schedule.lr) and lr[-1] == pytest.approx(0.1 * schedule.lr)


def _infinite(plan, recipe):
    web, code = plan["web"]["lr"], plan["code"]["lr"]
    const_lr = recipe.stage("code").schedule.const_lr
    assert web[-1] == pytest.approx(const_lr)  # task 1 ends on the constant branch
    assert code[0] == pytest.approx(const_lr)  # task 2 starts there, no re-warming
    schedule, steps = recipe.stage("code").schedule, len(code)
    # REFERENCES §1: the anneal runs (t - T_ann) / (T_end - T_ann) with T_end = steps, so the last
    # step is still above min_lr and the floor is met one step after the stage
    assert schedule.min_lr < code[-1] < const_lr
    assert lr_at(schedule, steps, steps) == pytest.approx(schedule.min_lr)


def _upsampling(plan, recipe):
    weights = plan["cpt"]["weights"]
    last = {d: w[-1] for d, w in weights.items()}
    assert last == pytest.approx({"large_cc": 0.0, "small_cc": 0.30, "domain": 0.35, "code": 0.35})
    assert weights["large_cc"][0] == pytest.approx(0.3435)


def _wsd(plan, recipe):
    lr, schedule, steps = plan["math"]["lr"], recipe.stage("math").schedule, plan["math"]["steps"]
    decay_start = steps - round(schedule.decay * steps)
    assert lr[decay_start - 1] == pytest.approx(schedule.lr)  # stable at the peak until the decay
    assert all(b < a for a, b in zip(lr[decay_start:], lr[decay_start + 1:]))  # then strictly down
    assert lr[-1] < 0.5 * schedule.lr


def _stability_gap(plan, recipe):
    weights, tokens = plan["math"]["weights"], plan["math"]["tokens_per_domain"]
    asked = recipe.stage("math").mixture.weights["math"]
    assert max(weights["math"]) < asked - 0.01  # the epoch cap binds: the subset is repeated no more than allowed
    assert min(weights["web"]) > 1 - asked  # the freed share goes to the general text, which keeps the majority
    assert tokens["math"] + tokens["web"] == plan["math"]["tokens"]


def _cmr_sweep(plan, recipe):
    for name in ("general", "domain"):
        lr, schedule = plan[name]["lr"], recipe.stage(name).schedule
        assert schedule.type == "constant" and lr[-1] == pytest.approx(schedule.lr)  # constant after the warmup
        assert len(set(lr[len(lr) // 2:])) == 1
    assert all(w == pytest.approx(0.5) for w in plan["domain"]["weights"]["math"])  # R = 0.5 as written


def _language(plan, recipe):
    weights = plan["german"]["weights"]
    assert min(weights["english"]) >= 0.2 - 1e-9  # English replay throughout
    assert weights["german"] == sorted(weights["german"])  # the curriculum only raises the new language
    assert recipe.stage("german").ema is not None
    vocabulary = plan["german"]["vocabulary"]  # German tokens added to the English vocabulary
    assert vocabulary["added"] == recipe.stage("german").tokenizer.extend.add
    assert vocabulary["compression"]["german"]["gain"] > 1


def _long_context(plan, recipe):
    lengths = [s.seq_len for s in recipe.stages]
    assert lengths == sorted(set(lengths)) and len(lengths) > 1
    assert len({s["tokens"] // s["steps"] for s in plan.values()}) == 1  # same tokens per step
    first, *longer = [s.model.overrides for s in recipe.stages]
    assert first.rope_theta == 500000.0 and first.rope_scaling is None  # ABF (Xiong et al.): base 10,000 -> 500,000
    assert all(o.rope_theta is None and o.rope_scaling is None for o in longer)  # later stages keep the base
    assert all(o.max_position_embeddings >= s.seq_len for o, s in zip([first, *longer], recipe.stages))
    assert all(s.continues for s in recipe.stages[1:])


def _seven_b(plan, recipe):
    _wsd(plan, recipe)
    assert all(abs(w - 0.75) < 1e-9 for w in plan["math"]["weights"]["math"])  # 25% replay
    assert recipe.distributed.zero_stage == 3 and recipe.stage("math").memory.activation_checkpointing  # the toy keeps both


def _meco(plan, recipe):
    metadata, steps = plan["meco"]["metadata"], plan["meco"]["steps"]
    conditioned = round(0.9 * steps)
    assert metadata == [True] * conditioned + [False] * (steps - conditioned)  # 90% conditioning, 10% cooldown
    assert recipe.stage("meco").document_masking  # MeCo keeps attention inside documents
    assert all(d.metadata is not None for d in recipe.stage("meco").data.values())


STRATEGY = {
    "rewarm-cosine-replay": _replay,
    "infinite-schedule": _infinite,
    "domain-upsampling": _upsampling,
    "wsd-anneal": _wsd,
    "stability-gap": _stability_gap,
    "cmr-sweep": _cmr_sweep,
    "language-adaptation": _language,
    "long-context": _long_context,
    "continue-7b-8gpu": _seven_b,
    "meco": _meco,
}


# Toy runs: real training of tiny models, a few steps per stage.


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """``toy_run(path)``: the run directory of the recipe's toy run, trained once per module."""
    done = {}

    def run(path: Path) -> Path:
        if path not in done:
            out = tmp_path_factory.mktemp(path.stem) / "run"
            proc = cpt("run", path, *with_toy(path), "--output-dir", out)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[path] = out
        return done[path]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("path", TOY_RECIPES, ids=ids(TOY_RECIPES))
def test_toy_run_finishes_every_stage(path, toy_run):
    out = toy_run(path)
    for stage in load_recipe(path, toy_overrides(path), check_files=False).stages:
        assert (out / stage.name / "final" / "config.json").is_file()
        summary = json.loads((out / stage.name / "summary.json").read_text())
        assert summary["stage"] == stage.name and summary["steps"] == stage.total_steps


@pytest.mark.slow
def test_stability_gap_toy_run_measures_the_gap(toy_run):
    out = toy_run(ROOT / "recipes" / "stability-gap.yaml")
    summary = json.loads((out / "math" / "summary.json").read_text())
    gap = summary["stability_gap"]["math"]
    assert set(gap) == {"gap", "peak_step", "recovered_step"} and gap["gap"] >= 0
    records = [r for r in read_metrics(out / "math" / "metrics.jsonl") if r.get("kind") == "eval"]
    assert [r["step"] for r in records] == list(range(0, 81, 4))
    rises = [r["delta/math"] for r in records]
    assert gap["gap"] == pytest.approx(max(0.0, *rises[: (gap["recovered_step"] or 80) // 4 + 1]))


@pytest.mark.slow
def test_language_adaptation_toy_run_evaluates_the_average_too(toy_run):
    path = ROOT / "recipes" / "language-adaptation.yaml"
    out = toy_run(path)
    stage = next(s for s in load_recipe(path, toy_overrides(path), check_files=False).stages if s.ema is not None)
    last = [r for r in read_metrics(out / stage.name / "metrics.jsonl") if r.get("kind") == "eval"][-1]
    names = [k for k in last if k.startswith("eval/") and k.endswith("/loss")]
    assert names and all(f"ema/{k}" in last and last[f"ema/{k}"] != last[k] for k in names)


@pytest.mark.slow
def test_wsd_toy_run_anneals_a_release_from_the_stable_phase(toy_run):
    path = ROOT / "recipes" / "wsd-anneal.yaml"
    stage_dir = toy_run(path) / "math"
    proc = cpt("anneal", stage_dir, "--from", "step-4", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    branch = stage_dir / "anneal-step-4"
    assert (branch / "final" / "config.json").is_file()
    lr = [r["lr"] for r in train_records(read_metrics(branch / "metrics.jsonl"))]
    main_lr = load_recipe(path, toy_overrides(path), check_files=False).stage("math").schedule.lr
    assert len(lr) == 2 and lr[0] == pytest.approx(main_lr) and lr[1] < lr[0]


@pytest.mark.slow
def test_cmr_toy_sweep_writes_the_table_cpt_fit_reads(tmp_path, capsys):
    path = ROOT / "recipes" / "cmr-sweep.yaml"
    out = tmp_path / "sweep"
    proc = cpt("sweep", path, *with_toy(path), "--stage", "domain", "--ratios", "0.5,1", "--tokens", "256,512",
               "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"ratio", "tokens", "general_loss", "domain_loss", "params", "loss/web", "loss/math"} <= set(rows[0])
    cells = sorted((float(r["ratio"]), int(r["tokens"])) for r in rows)
    assert cells == [(0.5, 256), (0.5, 512), (1.0, 256), (1.0, 512)]
    code, report, err = cpt_here(capsys, "fit", out, "--law", "cmr", "--json")
    assert code == 0, err
    assert [p["tokens"] for p in json.loads(report)["cmr"]["per_tokens"]] == [256, 512]
