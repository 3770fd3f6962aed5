"""Recipe schema, overrides, mixture includes, and the one-line error contract."""

from pathlib import Path

import pytest
import yaml

from cpt.config.load import apply_override, load_recipe
from cpt.config.recipe import dump_recipe
from cpt.errors import CptErrors

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(CptErrors) as info:
        load_recipe(path, list(overrides))
    return [str(e) for e in info.value.errors]


def test_quickstart_resolves_with_defaults():
    recipe = load_recipe(QUICKSTART)
    assert [s.name for s in recipe.stages] == ["pretrain", "cpt"]
    assert recipe.output_dir == "runs/quickstart"
    cpt = recipe.stage("cpt")
    assert cpt.mixture.replay == 0.25  # included from data_mixtures/replay-25.yaml
    assert cpt.model is None  # continues from the previous stage
    assert set(recipe.domains()) == {"prose", "code"}
    assert cpt.total_steps == 200


def test_dump_round_trips(tmp_path):
    recipe = load_recipe(QUICKSTART)
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe


def test_tokens_budget_rounds_up_to_whole_steps():
    recipe = load_recipe(QUICKSTART, ["stages.cpt.steps=null", "stages.cpt.tokens=10000"])
    assert recipe.stage("cpt").total_steps == 5  # 16 x 128 = 2048 tokens per step


def test_overrides_scalar_mapping_null_and_new_intermediates():
    raw = {"stages": [{"name": "a", "schedule": {"type": "cosine", "lr": 1.0}, "steps": 5}]}
    apply_override(raw, "stages.a.steps=7")
    apply_override(raw, "stages.a.schedule={type: wsd, lr: 3.0e-4, warmup: 100, decay: 0.2}")
    apply_override(raw, "stages.a.mixture.phases=[{until: 1.0, weights: {x: 1}}]")
    apply_override(raw, "seed=3")
    assert raw["stages"][0]["steps"] == 7
    assert raw["stages"][0]["schedule"] == {"type": "wsd", "lr": 3.0e-4, "warmup": 100, "decay": 0.2}
    assert raw["stages"][0]["mixture"] == {"phases": [{"until": 1.0, "weights": {"x": 1}}]}
    assert raw["seed"] == 3
    apply_override(raw, "stages.a.steps=null")
    assert "steps" not in raw["stages"][0]


def test_override_of_a_missing_stage_is_reported():
    errors = problems(QUICKSTART, ["stages.nope.steps=3"])
    assert len(errors) == 1 and "no stage named 'nope'" in errors[0] and "--set stages.nope.steps=3" in errors[0]


@pytest.mark.parametrize(
    "override, path, text",
    [
        ("stages.cpt.bogus=1", "stages.cpt.bogus", "unknown field"),
        ("stages.cpt.steps=many", "stages.cpt.steps", "integer"),
        ("stages.cpt.schedule.lr=fast", "stages.cpt.schedule.lr", "number"),
        ("stages.cpt.schedule.type=linear", "stages.cpt.schedule", "type"),
        ("stages.cpt.mixture={weights: {code: -1}}", "stages.cpt.mixture", ""),
        ("stages.cpt.mixture={weights: {code: 0}}", "stages.cpt.mixture", ""),
        ("stages.cpt.mixture={weights: {python: 1}}", "stages.cpt.mixture.weights", "unknown domain 'python'"),
        ("stages.cpt.data.code.source=/nonexistent/*.jsonl", "stages.cpt.data.code", ""),
        ("stages.cpt.data.code.heldout=100000", "stages.cpt.data.code.heldout", ""),
        ("stages.pretrain.mixture.replay=0.1", "stages.pretrain.mixture.replay", "earlier stage"),
        ("stages.cpt.tokens=100", "stages.cpt", "exactly one of steps or tokens"),
        ("stages.cpt.tokenizer=/no/such/tokenizer", "stages.cpt.tokenizer", "no such directory"),
    ],
)
def test_bad_fields_name_file_and_path(override, path, text):
    errors = problems(QUICKSTART, [override])
    assert errors, override
    assert any(e.startswith(f"{QUICKSTART}: {path}") and text in e for e in errors), errors


def test_stage_names_must_be_unique(tmp_path):
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["stages"][1]["name"] = "pretrain"
    errors = problems(write(tmp_path, yaml.safe_dump(raw)))
    assert any("duplicate stage name 'pretrain'" in e for e in errors)


def test_mixture_include_from_recipe_neighbourhood(tmp_path):
    (tmp_path / "data_mixtures").mkdir()
    (tmp_path / "data_mixtures" / "half.yaml").write_text("replay: 0.5\n")
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["stages"][1]["mixture"] = {"include": "half", "phases": [{"until": 1.0}]}
    recipe = load_recipe(write(tmp_path, yaml.safe_dump(raw)))
    assert recipe.stage("cpt").mixture.replay == 0.5
    raw["stages"][1]["mixture"] = "missing-mixture"
    errors = problems(write(tmp_path, yaml.safe_dump(raw)))
    assert any("stages.cpt.mixture" in e and "no mixture named 'missing-mixture'" in e for e in errors)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nstages: [\n", "invalid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping, got list"),
        ("", "must be a YAML mapping, got empty"),
        ("name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ],
)
def test_yaml_level_problems(tmp_path, text, message):
    path = write(tmp_path, text)
    errors = problems(path)
    assert len(errors) == 1 and errors[0].startswith(str(path)) and message in errors[0]


@pytest.mark.parametrize(
    "tasks, message",
    [
        ("[cpt_nextline_math]", "the recipe has no domain 'math'"),
        ("[missing/task.yaml]", "harness task file missing/task.yaml does not exist"),
    ],
)
def test_bad_harness_task_names_are_caught_by_validate(tiny_recipe, tasks, message, capsys):
    from cpt.cli import main

    assert main(["validate", str(tiny_recipe), "--set", f"stages.cpt.evaluation.harness.tasks={tasks}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stages.cpt.evaluation.harness.tasks" in err and message in err


def test_ratio_from_a_cmr_fit_becomes_the_replay_share(tiny_recipe, tmp_path, capsys):
    import json

    from cpt.cli import main

    fit = {"law": "cmr", "cmr": {"law": None, "per_tokens": [{"tokens": 1000, "ratio": 0.2}, {"tokens": 3000, "ratio": 0.4}]}}
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    ratio = "stages.cpt.mixture={ratio: {from_fit: fit.json, tokens: 2000}}"
    recipe = load_recipe(tiny_recipe, [ratio])
    assert recipe.stage("cpt").mixture.replay == pytest.approx(0.7)  # the domain gets the interpolated CMR 0.3
    assert main(["validate", str(tiny_recipe), "--set", ratio.replace("2000", "9000")]) == 2
    err = capsys.readouterr().err
    assert "stages.cpt.mixture" in err and "outside the measured budgets" in err and len(err.splitlines()) == 1


def test_evaluation_targets_name_known_domains(tiny_recipe, capsys):
    from cpt.cli import main

    assert load_recipe(tiny_recipe, ["stages.cpt.evaluation.targets=[code]"]).stage("cpt").evaluation.targets == ["code"]
    assert main(["validate", str(tiny_recipe), "--set", "stages.pretrain.evaluation.targets=[code]"]) == 2
    err = capsys.readouterr().err
    assert "stages.pretrain.evaluation.targets: unknown domain 'code'" in err


def test_offline_a_hub_id_is_refused_unless_the_hub_cache_holds_it(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (set for the whole suite): transformers can still load what was downloaded before."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    override = "stages.cpt.tokenizer=acme/tiny-tokenizer"
    errors = problems(QUICKSTART, [override])
    assert any("acme/tiny-tokenizer is not a local directory, not in the Hugging Face cache" in e for e in errors), errors
    repo = tmp_path / "models--acme--tiny-tokenizer"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "tokenizer.json").write_text("{}")
    assert load_recipe(QUICKSTART, [override]).stage("cpt").tokenizer.path == "acme/tiny-tokenizer"
