"""The bad-input contract of every command: one `error: <what>: <message>` line, exit 2, no
traceback, nothing written.

Each case runs a command on one bad input (a missing or unreadable path, a directory where a
file is expected or the reverse, a malformed `--set`, a non-numeric table, an empty run
directory) and checks the whole contract, because a half-kept contract (the right message after
a stray temporary file, or a traceback after a correct message) is what users meet. No case
trains anything, nor even plans the recipe: the input must be refused before that.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RECIPE

from cpt.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
NOT_UTF8 = b"name: \xff\xfe\n"
TABLE = "params,tokens,loss,ratio,general_loss,domain_loss\n" + "".join(
    f"{n:g},{d:g},{2 + 400 / n**0.3 + 1e3 / d**0.3:.4f},{r},{2.5 + r / 4},{3 - r}\n"
    for n in (1e6, 4e6, 1.6e7) for d, r in ((1e8, 0.25), (4e8, 0.5), (1.6e9, 0.75))
)
SET_HINT = "expected FIELD.PATH=VALUE"
NOT_CHECKPOINT = "not a complete cpt checkpoint"

# (command line, fragment of the error line, xfail reason for the lead or None); {name} are the paths of `inputs`.
CASES = {
    "validate-missing": ("validate {missing}", "{missing}: cannot read file: No such file", None),
    "validate-unreadable": ("validate {locked}", "{locked}: cannot read file: Permission denied", None),
    "validate-not-utf8": ("validate {binary}", "{binary}: cannot read file: not UTF-8 text", None),
    "validate-directory": ("validate {empty}", "{empty}: cannot read file: Is a directory", None),
    "validate-file-as-directory": ("validate {recipe} --set stages.pretrain.tokenizer={file}",
                                   "stages.pretrain.tokenizer: {file} is not a directory", None),
    "validate-malformed-set": ("validate {recipe} --set stages.cpt.steps", SET_HINT, None),

    "plan-missing": ("plan {missing}", "{missing}: cannot read file", None),
    "plan-unreadable": ("plan {locked}", "{locked}: cannot read file", None),
    "plan-not-utf8": ("plan {binary}", "{binary}: cannot read file", None),
    "plan-directory": ("plan {empty}", "{empty}: cannot read file", None),
    "plan-png-directory": ("plan {recipe} --png {empty}", "--png: {empty} is a directory", None),
    "plan-png-under-file": ("plan {recipe} --png {file}/plan.png", "{file}: exists and is not a directory", None),
    "plan-malformed-set": ("plan {recipe} --set stages.cpt.steps", SET_HINT, None),

    "run-missing": ("run {missing}", "{missing}: cannot read file", None),
    "run-unreadable": ("run {locked}", "{locked}: cannot read file", None),
    "run-not-utf8": ("run {binary}", "{binary}: cannot read file", None),
    "run-directory": ("run {empty}", "{empty}: cannot read file", None),
    "run-output-dir-file": ("run {recipe} --output-dir {file}", "{file}: exists and is not a directory", None),
    "run-malformed-set": ("run {recipe} --set stages.cpt.steps", SET_HINT, None),

    "anneal-missing": ("anneal {missing}/pretrain --from step-4 --steps 2", "no recipe.yaml", None),
    "anneal-empty-run": ("anneal {empty}/pretrain --from step-4 --steps 2", "{empty} is not a cpt run directory", None),
    "anneal-missing-checkpoint": ("anneal {run}/pretrain --from step-9 --steps 2", NOT_CHECKPOINT, None),
    "anneal-file-as-stage": ("anneal {run}/recipe.yaml --from step-4 --steps 2", NOT_CHECKPOINT, None),
    "anneal-recipe-directory": ("anneal {dir_recipe_run}/pretrain --from step-4 --steps 2", "no recipe.yaml", None),
    "anneal-unreadable": ("anneal {locked_run}/pretrain --from step-4 --steps 2", NOT_CHECKPOINT, None),
    "anneal-not-utf8": ("anneal {binary_run}/pretrain --from step-4 --steps 2", "cannot read file", None),
    "anneal-malformed-set": (
        "anneal {run}/pretrain --from step-4 --steps 2 --set steps", SET_HINT, None),
    "anneal-steps-not-a-number": ("anneal {run}/pretrain --from step-4 --steps two",
                                  "cpt anneal: argument --steps: invalid int value: 'two'", None),

    "export-missing": ("export {missing} {out}", "{missing} is " + NOT_CHECKPOINT, None),
    "export-empty-run": ("export {empty} {out}", "{empty} is " + NOT_CHECKPOINT, None),
    "export-file-as-checkpoint": ("export {file} {out}", "{file} is " + NOT_CHECKPOINT, None),
    "export-unreadable": ("export {locked_run}/pretrain/checkpoints/step-4 {out}", NOT_CHECKPOINT, None),
    "export-incomplete-checkpoint": ("export {run}/pretrain/checkpoints/step-4 {out}",
                                     "no hf/config.json and no global_step4", None),
    "export-out-is-file": ("export {run}/pretrain/checkpoints/step-4 {file}", "{file} already exists", None),
    "export-out-under-file": ("export {run}/pretrain/checkpoints/step-4 {file}/model",
                              "{file}: exists and is not a directory", None),

    "eval-missing": ("eval {missing} --recipe {tiny}", "{missing}: no such directory", None),
    "eval-file-as-model": ("eval {file} --recipe {tiny}", "{file} is not a directory", None),
    "eval-empty-run": ("eval {empty} --recipe {tiny}", "no config.json", None),
    "eval-unreadable": ("eval {locked_run}/pretrain/final --recipe {tiny}", "config.json: cannot read file", None),
    "eval-recipe-missing": ("eval {empty} --recipe {missing}", "{missing}: cannot read file", None),
    "eval-recipe-directory": ("eval {empty} --recipe {empty}", "{empty}: cannot read file", None),
    "eval-recipe-not-utf8": ("eval {empty} --recipe {binary}", "{binary}: cannot read file", None),
    "eval-malformed-set": ("eval {empty} --recipe {tiny} --set stages.cpt.steps", SET_HINT, None),

    "report-missing": ("report {missing}", "{missing}: no such run directory", None),
    "report-file-as-run": ("report {file}", "{file}: not a directory", None),
    "report-empty-run": ("report {empty}", "{empty}: not a cpt run directory", None),
    "report-nothing-logged": ("report {fresh_run}", "no metrics yet", None),
    "report-recipe-directory": ("report {dir_recipe_run}", "no recipe.yaml", None),
    "report-unreadable": ("report {locked_run}", "recipe.yaml: cannot read file: Permission denied", None),
    "report-not-utf8": ("report {binary_run}", "recipe.yaml: cannot read file: not UTF-8 text", None),
    "report-out-is-file": ("report {run} --out {file}", "{file}: exists and is not a directory", None),

    "compare-missing": ("compare {run} {missing}", "{missing}: no such run directory", None),
    "compare-file-as-run": ("compare {run} {file}", "{file}: not a directory", None),
    "compare-empty-run": ("compare {run} {empty}", "{empty}: not a cpt run directory", None),
    "compare-nothing-logged": ("compare {run} {fresh_run}", "no metrics yet", None),
    "compare-unreadable": ("compare {run} {locked_run}", "cannot read file: Permission denied", None),
    "compare-not-utf8": ("compare {run} {binary_run}", "cannot read file: not UTF-8 text", None),
    "compare-out-is-file": ("compare {run} {run} --out {file}", "{file}: exists and is not a directory", None),

    "fit-missing": ("fit {missing} --law chinchilla", "{missing}: no such file", None),
    "fit-directory-without-table": ("fit {empty} --law chinchilla", "a directory without sweep.csv", None),
    "fit-table-is-directory": ("fit {dir_table} --law chinchilla", "sweep.csv: cannot read file: Is a directory", None),
    "fit-unreadable": ("fit {locked} --law chinchilla", "{locked}: cannot read file: Permission denied", None),
    "fit-not-utf8": ("fit {binary} --law chinchilla", "{binary}: cannot read file: not UTF-8 text", None),
    "fit-non-numeric": ("fit {non_numeric} --law chinchilla", "column 'tokens', line 2: 'lots' is not a finite number",
                        None),
    "fit-png-directory": ("fit {table} --law chinchilla --png {empty}", "--png: {empty} is a directory", None),
    "fit-mixture-directory": ("fit {table} --law cmr --baseline-general-loss 2.6 --write-mixture {empty}",
                              "--write-mixture: {empty} is a directory", None),
    "fit-png-under-file": ("fit {table} --law chinchilla --png {file}/fit.png", "{file}: exists and is not a directory",
                           None),

    "sweep-missing": ("sweep {missing} --stage cpt --ratios 0.5", "{missing}: cannot read file", None),
    "sweep-unreadable": ("sweep {locked} --stage cpt --ratios 0.5", "{locked}: cannot read file", None),
    "sweep-not-utf8": ("sweep {binary} --stage cpt --ratios 0.5", "{binary}: cannot read file", None),
    "sweep-directory": ("sweep {empty} --stage cpt --ratios 0.5", "{empty}: cannot read file", None),
    "sweep-output-dir-file": ("sweep {recipe} --stage cpt --ratios 0.5 --output-dir {file}",
                              "{file}: exists and is not a directory", None),
    "sweep-malformed-set": ("sweep {recipe} --stage cpt --ratios 0.5 --set stages.cpt.steps", SET_HINT, None),
    "sweep-ratio-out-of-range": ("sweep {recipe} --stage cpt --ratios 0.5,1.5",
                                 "--ratios: ratios must lie in [0, 1], got 1.5", None),
    "sweep-ratios-not-numbers": ("sweep {recipe} --stage cpt --ratios half",
                                 "cpt sweep: argument --ratios: expected comma-separated numbers", None),

    "prepare-missing": ("prepare {missing}", "{missing}: cannot read file", None),
    "prepare-unreadable": ("prepare {locked}", "{locked}: cannot read file", None),
    "prepare-not-utf8": ("prepare {binary}", "{binary}: cannot read file", None),
    "prepare-directory": ("prepare {empty}", "{empty}: cannot read file", None),
    "prepare-malformed-set": ("prepare {recipe} --set stages.cpt.steps", SET_HINT, None),
    "prepare-shard-out-of-range": ("prepare {recipe} --shard 3/2",
                                   "argument --shard: 3/2: the shard index must be at least 0 and below", None),
    "prepare-shard-not-numbers": ("prepare {recipe} --shard a/b", "argument --shard: expected i/n with whole numbers",
                                  None),
    "prepare-no-workers": ("prepare {recipe} --workers 0", "argument --workers: expected a whole number >= 1", None),

    "merge-missing": ("merge linear {missing} {empty} --alpha 0.5 --out {out}", "{missing}: no such directory", None),
    "merge-file-as-model": ("merge linear {file} {empty} --alpha 0.5 --out {out}", "{file}: not a directory", None),
    "merge-empty-model": ("merge average {empty} {empty} --out {out}", "not a Hugging Face model directory", None),
    "merge-alpha-out-of-range": ("merge slerp {empty} {empty} --alpha 2 --out {out}", "--alpha must be in [0, 1]",
                                 None),
    "merge-one-model": ("merge average {empty} --out {out}", "average needs at least two models", None),
}
THROUGH_ENTRY_POINT = ("validate-missing", "fit-non-numeric", "report-not-utf8")


@pytest.fixture(autouse=True)
def refuse_planning(monkeypatch):
    """Planning trains a tokenizer and tokenizes every domain (hours on real data): a bad input
    must be refused before that, so here planning fails the test instead of taking its time."""
    import cpt.plan

    def refuse(*_args, **_kwargs):
        raise AssertionError("planned the recipe before refusing the bad input")

    # a module first imported while the patch is on would keep `refuse` for the rest of the
    # session (monkeypatch restores only what it set): import every module that binds them first
    for info in pkgutil.walk_packages(cpt.__path__, "cpt."):
        importlib.import_module(info.name)
    names = ("plan_recipe", "stage_tokenizer", "trained_tokenizer")
    originals = {getattr(cpt.plan, name) for name in names}
    for module in [m for key, m in sys.modules.items() if key == "cpt" or key.startswith("cpt.")]:
        for name in names:
            if getattr(module, name, None) in originals:  # also modules that imported it by name
                monkeypatch.setattr(module, name, refuse)


def write_run(root: Path, recipe: str | bytes | None) -> Path:
    """A run directory as `cpt run` leaves it mid-stage: recipe.yaml (None: a directory there),
    a metrics record, a checkpoint marker (no weights) and a final/config.json."""
    stage = root / "pretrain"
    (stage / "checkpoints" / "step-4").mkdir(parents=True)
    (stage / "final").mkdir()
    if recipe is None:
        (root / "recipe.yaml").mkdir()
    else:
        (root / "recipe.yaml").write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    (stage / "metrics.jsonl").write_text(json.dumps({"step": 0, "tokens": 256, "loss": 5.0}) + "\n")
    marker = {"format": 1, "step": 4, "tag": "global_step4", "zero_stage": 0, "precision": "fp32"}
    (stage / "checkpoints" / "step-4" / "cpt_checkpoint.json").write_text(json.dumps(marker))
    (stage / "final" / "config.json").write_text('{"model_type": "llama"}')
    return root


def lock(*paths: Path) -> None:
    """chmod 000, or skip: root (as in many containers) reads such files anyway."""
    for path in paths:
        path.chmod(0)
    try:
        paths[0].read_bytes()
    except PermissionError:
        return
    pytest.skip("chmod 000 does not stop this user (root) from reading; the not-UTF-8 cases cover unreadable files")


def inputs(tmp_path: Path, names: set[str]) -> dict[str, str]:
    """The paths a case line names, created (bad ones on purpose) under ``tmp_path``."""
    tiny = TINY_RECIPE.format(out=tmp_path / "tiny-run")
    paths = {"recipe": QUICKSTART, "missing": tmp_path / "missing", "out": tmp_path / "out"}
    makers = {
        "empty": lambda p: p.mkdir(),
        "file": lambda p: p.write_text("not a directory\n"),
        "binary": lambda p: p.write_bytes(NOT_UTF8),
        "locked": lambda p: p.write_text("name: locked\n"),
        "tiny": lambda p: p.write_text(tiny),
        "table": lambda p: p.write_text(TABLE),
        "non_numeric": lambda p: p.write_text(TABLE.replace(",1e+08,", ",lots,", 1)),
        "dir_table": lambda p: (p / "sweep.csv").mkdir(parents=True),
        "run": lambda p: write_run(p, tiny),
        "fresh_run": lambda p: (p.mkdir(), (p / "recipe.yaml").write_text(tiny)),
        "dir_recipe_run": lambda p: write_run(p, None),
        "binary_run": lambda p: write_run(p, NOT_UTF8),
        "locked_run": lambda p: write_run(p, tiny),
    }
    for name in names & set(makers):
        paths[name] = tmp_path / name
        makers[name](paths[name])
    if "locked" in names:
        lock(paths["locked"])
    if "locked_run" in names:
        run = paths["locked_run"]
        lock(run / "recipe.yaml", run / "pretrain" / "checkpoints" / "step-4" / "cpt_checkpoint.json",
             run / "pretrain" / "final" / "config.json")
    return {k: str(v) for k, v in paths.items()}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its mtime and size: a write, even of a removed temporary, changes it."""
    return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}


def prepared(case_id: str, tmp_path: Path, monkeypatch) -> tuple[list[str], str, dict]:
    """The case's argv and expected fragment with paths filled in, run from ``tmp_path`` so that
    default outputs (runs/quickstart, ./cpt-compare) would land where the snapshot sees them."""
    line, expected, _ = CASES[case_id]
    tokens = shlex.split(line)
    names = {part.split("}")[0] for token in tokens for part in token.split("{")[1:]}
    paths = inputs(tmp_path, names)
    monkeypatch.chdir(tmp_path)
    return [token.format(**paths) for token in tokens], expected.format(**paths), snapshot(tmp_path)


def assert_contract(code: int, out: str, err: str, expected: str, before: dict, tmp_path: Path) -> None:
    assert code == 2, err
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert out == ""
    assert snapshot(tmp_path) == before, "the command wrote or removed files"


def case_params(ids):
    """The cases as test parameters; those the lead still has to fix are strict xfails."""
    return [pytest.param(i, id=i, marks=[pytest.mark.xfail(strict=True, reason=CASES[i][2])] if CASES[i][2] else [])
            for i in ids]


@pytest.mark.parametrize("case_id", case_params(CASES))
def test_bad_input(case_id, tmp_path, monkeypatch, capsys):
    argv, expected, before = prepared(case_id, tmp_path, monkeypatch)
    code = main(argv)
    out, err = capsys.readouterr()
    assert_contract(code, out, err, expected, before, tmp_path)


@pytest.mark.parametrize("case_id", case_params(THROUGH_ENTRY_POINT))
def test_bad_input_through_the_entry_point(case_id, tmp_path, monkeypatch):
    """The same contract from `python -m cpt.cli`, where an escaping exception would print a traceback."""
    argv, expected, before = prepared(case_id, tmp_path, monkeypatch)
    proc = subprocess.run([sys.executable, "-m", "cpt.cli", *argv], capture_output=True, text=True, timeout=120)
    assert_contract(proc.returncode, proc.stdout, proc.stderr, expected, before, tmp_path)


def test_every_command_has_cases():
    """Each command meets the contract somewhere in the table."""
    from cpt.cli import COMMANDS

    assert {case.split("-")[0] for case in CASES} == set(COMMANDS)
