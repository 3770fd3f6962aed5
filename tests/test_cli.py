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


TRAINER_FIELDS = {
    "zero stage": ("distributed.zero_stage=5", "distributed.zero_stage:"),
    "precision": ("distributed.precision=fp16", "distributed.precision:"),
    "processes": ("distributed.num_processes=0", "distributed.num_processes:"),
    "offload without zero": ("distributed.offload_optimizer=true", "distributed:"),
    "betas": ("stages.cpt.optimizer.betas=[1.2, 0.9]", "stages.cpt.optimizer:"),
    "weight decay": ("stages.cpt.optimizer.weight_decay=-1", "stages.cpt.optimizer.weight_decay:"),
    "clip": ("stages.cpt.optimizer.grad_clip=.nan", "stages.cpt.optimizer.grad_clip:"),
    "checkpoint every": ("stages.cpt.checkpoint.every=0", "stages.cpt.checkpoint.every:"),
    "keep": ("stages.cpt.checkpoint.keep=-2", "stages.cpt.checkpoint.keep:"),
    "lr": ("stages.cpt.schedule.lr=-1", "stages.cpt.schedule.lr:"),
    "warmup fraction": ("stages.cpt.schedule.warmup=1.5", "stages.cpt.schedule.warmup:"),
    "decay type": ("stages.cpt.schedule.decay_type=quadratic", "stages.cpt.schedule.decay_type:"),
    "schedule too long": ("stages.cpt.schedule.warmup=10", "stages.cpt.schedule"),
    "infinite const above peak": (
        "stages.cpt.schedule={type: infinite, lr: 1.0e-3, const_lr: 2.0e-3, min_lr: 1.0e-4}", "stages.cpt.schedule"),
    "micro batch": ("stages.cpt.batch.micro_batch_size=3", "stages.cpt:"),
    "max_nonfinite": ("stages.cpt.optimizer.max_nonfinite=-1", "stages.cpt.optimizer.max_nonfinite:"),
}


@pytest.mark.parametrize("case", sorted(TRAINER_FIELDS))
def test_bad_trainer_fields(capsys, tiny_recipe, case):
    override, expected = TRAINER_FIELDS[case]
    code, out, err = run_cli(capsys, "validate", tiny_recipe, "--set", override)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines and all(line.startswith(f"error: {tiny_recipe}: ") for line in lines), err
    assert any(expected in line for line in lines), err
