"""The `cpt` command line: output contracts and the bad-input contract (one line, exit 2, nothing written)."""

import json
import subprocess
import sys

import pytest

from cpt.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_prints_the_resolved_recipe(capsys, tiny_recipe):
    code, out, err = run_cli(capsys, "validate", tiny_recipe, "--set", "stages.cpt.steps=5")
    assert code == 0, err
    assert "steps: 5" in out and "heldout: 4" in out and "weight_decay: 0.1" in out  # defaults resolved


def test_plan_json_contract(capsys, tiny_recipe, tmp_path):
    png = tmp_path / "plan.png"
    code, out, err = run_cli(capsys, "plan", tiny_recipe, "--json", "--png", png)
    assert code == 0, err
    stages = json.loads(out)["stages"]
    assert [s["name"] for s in stages] == ["pretrain", "cpt"]
    for stage in stages:
        assert set(stage) == {"name", "steps", "tokens", "tokens_per_domain", "lr", "weights"}
        assert len(stage["lr"]) == stage["steps"] == 12
        assert stage["tokens"] == 12 * 8 * 32
        assert sum(stage["tokens_per_domain"].values()) == stage["tokens"]
        for series in stage["weights"].values():
            assert len(series) == stage["steps"]
    cpt = stages[1]
    assert cpt["weights"]["prose"][0] == pytest.approx(0.25) and cpt["weights"]["code"][0] == pytest.approx(0.75)
    assert cpt["tokens_per_domain"] == {"code": 12 * 8 * 32 * 3 // 4, "prose": 12 * 8 * 32 // 4}
    assert png.stat().st_size > 10_000


def test_plan_table(capsys, tiny_recipe):
    code, out, _ = run_cli(capsys, "plan", tiny_recipe)
    assert code == 0
    assert "stage cpt: 12 steps" in out and "prose" in out and "epochs" in out


BAD_INPUTS = {
    "unknown key": (["--set", "stages.cpt.colour=blue"], "stages.cpt.colour: unknown field"),
    "wrong type": (["--set", "stages.cpt.seq_len=long"], "stages.cpt.seq_len:"),
    "negative weight": (["--set", "stages.cpt.mixture={weights: {code: -1}}"], "stages.cpt.mixture.weights.code:"),
    "all-zero weights": (["--set", "stages.cpt.mixture={weights: {code: 0}}"], "stages.cpt.mixture.weights:"),
    "unknown domain": (["--set", "stages.cpt.mixture={weights: {rust: 1}}"], "unknown domain 'rust'"),
    "missing file": (["--set", "stages.cpt.data.code.source=/no/such/dir/*.jsonl"], "stages.cpt.data.code.source:"),
    "domain too small": (["--set", "stages.cpt.data.code.heldout=100000"], "stages.cpt.data.code.heldout:"),
    "unreadable tokenizer": (["--set", "stages.pretrain.tokenizer=/no/such/tokenizer"], "stages.pretrain.tokenizer:"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tiny_recipe, tmp_path, case, command):
    overrides, expected = BAD_INPUTS[case]
    png = tmp_path / "never.png"
    extra = ["--png", png] if command == "plan" else []
    code, out, err = run_cli(capsys, command, tiny_recipe, *overrides, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines and all(line.startswith(f"error: {tiny_recipe}: ") for line in lines), err
    assert any(expected in line for line in lines), err
    assert "Traceback" not in err and out == ""
    assert not png.exists()


def test_tokenizer_directory_that_is_not_a_tokenizer(capsys, tiny_recipe, tmp_path):
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    code, _, err = run_cli(capsys, "plan", tiny_recipe, "--set", f"stages.pretrain.tokenizer={broken}")
    assert code == 2 and err.startswith(f"error: {tiny_recipe}: stages.pretrain.tokenizer: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\nstages: [\n", "invalid YAML"),
        ("[1, 2]\n", "must be a YAML mapping"),
        ("!!python/object/apply:os.system ['touch {marker}']\n", "invalid YAML"),
    ],
)
def test_yaml_problems_through_the_console_script(tmp_path, text, expected):
    """The installed entry point, as a user runs it: no traceback, exit 2, the tag never runs."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.format(marker=marker))
    proc = subprocess.run(
        [sys.executable, "-m", "cpt.cli", "validate", str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {recipe}") and expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()
