"""The documentation site builds in strict mode, and its reference pages match the code."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Literal, Union

import pytest
from pydantic import BaseModel, Field

from cpt import docgen
from cpt.cli import build_parser
from cpt.config.recipe import Recipe
from cpt.config.schema import Length, Strict

ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_in_strict_mode(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()


def test_reference_pages_are_current(capsys):
    code = docgen.main(["--check", "--dir", str(ROOT / docgen.PAGES_DIR)])
    assert code == 0, f"run `python -m cpt.docgen`:\n{capsys.readouterr().err}"


def test_check_names_each_stale_page(tmp_path, capsys):
    assert docgen.main(["--dir", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--dir", str(tmp_path)]) == 0
    page = tmp_path / "recipe.md"
    page.write_text(page.read_text() + "edited by hand\n")
    (tmp_path / "cli.md").unlink()
    capsys.readouterr()
    assert docgen.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "recipe.md") in err and str(tmp_path / "cli.md") in err
    assert not (tmp_path / "cli.md").exists()  # --check writes nothing


def test_recipes_named_in_the_docs_exist():
    pages = (ROOT / "docs").rglob("*.md")
    named = {m for page in pages for m in re.findall(r"recipes/[\w.-]+\.yaml", page.read_text())}
    assert "recipes/quickstart.yaml" in named
    assert not sorted(p for p in named if not (ROOT / p).is_file())


# ----------------------------------------------------------------------------- coverage of the schema


def _models_in(tp) -> list[tuple[type[BaseModel], str]]:
    """(model, path suffix) of every model inside a field's type, walked without cpt.docgen."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (Union, types.UnionType):
        return [found for arg in args for found in _models_in(arg)]
    if origin is list:
        return [(model, "[]" + suffix) for model, suffix in _models_in(args[0])]
    if origin is dict:
        return [(model, ".<name>" + suffix) for model, suffix in _models_in(args[1])]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [(tp, "")]
    return []


def _paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)  # as recipes write it (`from`)
        paths.add(path)
        for nested, suffix in _models_in(field.annotation):
            paths |= _paths(nested, f"{path}{suffix}.")
    return paths


def test_recipe_page_lists_every_field_of_the_schema():
    page = (ROOT / "docs" / "reference" / "recipe.md").read_text()
    paths = _paths(Recipe)
    assert {"stages[].schedule.const_lr", "stages[].data.<name>.hf.streaming", "stages[].ema.decay"} <= paths
    missing = sorted(p for p in paths if f"| `{p}` |" not in page)
    assert not missing, missing
    assert set(docgen.field_paths(Recipe)) == paths


def test_every_schedule_type_has_its_own_table():
    page = docgen.recipe_page()
    for kind in ("constant", "cosine", "wsd", "infinite", "wsd-s"):
        assert f"## `stages[].schedule` (`type: {kind}`)" in page


class _Inner(Strict):
    """An inner block."""

    size: int = Field(default=4, gt=0, description="how big it is")


class _Outer(Strict):
    """The outer block."""

    every: Length = 0.5  # how often, from a comment
    # a comment on the line above
    kind: Literal["a", "b"] = "a"
    plain: str
    inner: _Inner = Field(default_factory=_Inner)
    items: list[_Inner] | None = None


def test_meaning_comes_from_description_then_comment_then_a_dash():
    sections = {s.path: s for s in docgen.walk_model(_Outer)}
    assert set(sections) == {"", "inner", "items[]"}
    rows = {r.path: r for s in sections.values() for r in s.rows}
    assert rows["every"].meaning == "how often, from a comment"
    assert rows["kind"].meaning == "a comment on the line above"
    assert rows["plain"].meaning == docgen.MISSING
    assert rows["inner.size"].meaning == "how big it is"
    assert sections["items[]"].doc == "An inner block."


@pytest.mark.parametrize(
    ("path", "type_text", "default"),
    [
        ("every", "length", "0.5"),
        ("kind", "one of: a, b", "a"),
        ("plain", "str", "required"),
        ("inner", "mapping", "{}"),
        ("inner.size", "int (> 0)", "4"),
        ("items", "list of mapping or null", "null"),
    ],
)
def test_types_and_defaults_are_written_as_in_yaml(path, type_text, default):
    rows = {r.path: r for s in docgen.walk_model(_Outer) for r in s.rows}
    assert (rows[path].type, rows[path].default) == (type_text, default)


# ----------------------------------------------------------------------------- coverage of the CLI


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"^## `(cpt [a-z-]+)`$", page, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cli_page_lists_every_command_and_flag():
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    sections = _sections(page)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(sections) == {f"cpt {name}" for name in commands}
    for name, sub in commands.items():
        text = sections[f"cpt {name}"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            shown = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
            assert f"`{shown}" in text, f"cpt {name}: {shown}"
            if action.help:
                expanded = " ".join(sub._get_formatter()._expand_help(action).split())
                assert expanded.replace("|", "\\|") in text, f"cpt {name}: help of {shown}"
