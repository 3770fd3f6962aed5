"""Reference pages generated from the code, so that the documentation cannot drift from it.

``python -m cpt.docgen`` writes ``docs/reference/recipe.md`` (every recipe field, walked from the
pydantic models) and ``docs/reference/cli.md`` (every command and flag, walked from
:func:`cpt.cli.build_parser`). ``python -m cpt.docgen --check`` writes nothing and exits 1 naming
each page that differs from what the code gives; the test suite runs it. Both work on the
repository root's ``docs/reference`` unless ``--dir`` names another folder.

A field's meaning is its ``description=``, else the ``#`` comment on its line (or the comment
lines right above it) in the model's source, else "—". Output depends only on the code: models
in declaration order, no timestamps, a fixed line width for usage lines.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cpt.config.recipe import STAGE_NAME, Name, Recipe
from cpt.config.schema import Length

PAGES_DIR = Path("docs/reference")
MISSING = "—"
USAGE_WIDTH = 100
_LENGTH_MARK = typing.get_args(Length)[1]
_NAME_MARK = typing.get_args(Name)[1]


# ----------------------------------------------------------------------------- recipe fields


@dataclass(frozen=True)
class FieldRow:
    path: str  # dotted path, e.g. stages[].schedule.lr
    type: str
    default: str
    meaning: str


@dataclass(frozen=True)
class Section:
    """One model of the schema, at the dotted path where recipes write it."""

    path: str  # "" for the top level
    variant: str  # "type: wsd" for a member of a union told apart by its type, else ""
    doc: str
    rows: tuple[FieldRow, ...]


def walk_model(model: type[BaseModel], prefix: str = "", variant: str = "") -> Iterator[Section]:
    """Sections of ``model`` and of every model nested in it, depth first in declaration order."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"  # as recipes write it: `from`, not `from_`
        rows.append(FieldRow(path, type_text(field.annotation, field.metadata), default_text(field),
                             field.description or field_comment(model, name) or MISSING))
        nested.extend(_nested(field.annotation, path, field.discriminator))
    yield Section(prefix.rstrip("."), variant, _doc(model), tuple(rows))
    for child, child_prefix, child_variant in nested:
        yield from walk_model(child, child_prefix, child_variant)


def _nested(annotation: Any, path: str, discriminator: str | None) -> list[tuple[type[BaseModel], str, str]]:
    """Models reachable from a field: ``path.`` for a model, ``path[].`` in a list, ``path.<key>.`` in a mapping."""
    found: list[tuple[type[BaseModel], str, str]] = []
    members = [m for m in _union_members(_strip(annotation)) if m is not type(None)]
    for member in members:
        member = _strip(member)
        origin, args = typing.get_origin(member), typing.get_args(member)
        if _is_model(member):
            variant = f"{discriminator}: {member.model_fields[discriminator].default}" if discriminator else ""
            found.append((member, f"{path}.", variant))
        elif origin is list and args and _is_model(_strip(args[0])):
            found.append((_strip(args[0]), f"{path}[].", ""))
        elif origin is dict and len(args) == 2 and _is_model(_strip(args[1])):
            found.append((_strip(args[1]), f"{path}.<name>.", ""))
    return found


def field_paths(model: type[BaseModel]) -> list[str]:
    """Every dotted path of the schema (a path shared by several union members appears once)."""
    return list(dict.fromkeys(row.path for section in walk_model(model) for row in section.rows))


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """``#`` comments attached to the annotated attributes of a class body, by attribute name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
        above, n = [], node.lineno - 1
        while n in by_line and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, by_line[n])
            n -= 1
        text = " ".join(trailing or above)
        if text:
            found[node.target.id] = text
    return found


def field_comment(model: type[BaseModel], name: str) -> str:
    """The comment on ``name`` in the class (of ``model``'s bases) that declares it."""
    for cls in model.__mro__:
        if name in inspect.get_annotations(cls):
            return _comments(cls).get(name, "")
    return ""


def _doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


# ----------------------------------------------------------------------------- type and default text


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp: Any) -> Any:
    """The type inside ``Annotated[...]``."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


_BOUNDS = (
    (annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="),
    (annotated_types.MinLen, "min_length", "length >="), (annotated_types.MaxLen, "max_length", "length <="),
)


def _constraints(metadata: list[Any]) -> tuple[list[str], str | None]:
    """Readable bounds from pydantic metadata, and "length" or "name" for cpt's own value types."""
    out, kind = [], None
    for item in metadata:
        if isinstance(item, FieldInfo):
            more, more_kind = _constraints(item.metadata)
            out.extend(more)
            kind = kind or more_kind
        elif item is _LENGTH_MARK:
            kind = "length"
        elif item is _NAME_MARK:
            kind = "name"
        for bound, attr, sign in _BOUNDS:
            if isinstance(item, bound):
                out.append(f"{sign} {_value(getattr(item, attr))}")
    return out, kind


def type_text(tp: Any, metadata: list[Any] = ()) -> str:
    """``tp`` in words: ``int (> 0) or null``, ``list of str``, ``one of: linear, cosine``."""
    if typing.get_origin(tp) is typing.Annotated:
        inner, *extra = typing.get_args(tp)
        return type_text(inner, [*metadata, *extra])
    members = _union_members(tp)
    if len(members) > 1:
        models = [_strip(m) for m in members if _is_model(_strip(m))]
        if len(models) > 1:
            return "mapping, by `type`: " + ", ".join(_value(m.model_fields["type"].default) for m in models)
        parts = [type_text(m, metadata) for m in members if m is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in members else "")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of: " + ", ".join(_value(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if _is_model(tp):
        return "mapping"
    bounds, kind = _constraints(list(metadata))
    name = kind or ("any" if tp is Any else getattr(tp, "__name__", str(tp)))
    return f"{name} ({', '.join(bounds)})" if bounds else name


def _value(value: Any) -> str:
    """A value as it is written in YAML."""
    if isinstance(value, BaseModel):
        return "{}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return _value(field.default_factory())
    if field.default is PydanticUndefined:
        return "required"
    return _value(field.default)


# ----------------------------------------------------------------------------- pages


GENERATED = "<!-- Generated by `python -m cpt.docgen` from {source}. Do not edit: run it again. -->"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def recipe_page() -> str:
    out = [
        GENERATED.format(source="the pydantic models of cpt/config/"), "",
        "# Recipe reference", "",
        "Every field of a recipe, walked from the schema that `cpt validate` checks. Paths are dotted:",
        "`stages[]` is any item of the `stages` list, `<name>` a key you choose (a domain name).",
        "`--set` addresses a stage by its name instead: `stages[].schedule.lr` is set with",
        "`--set stages.cpt.schedule.lr=3e-4`. Unknown fields are errors.", "",
        "- **length**: optimizer steps when >= 1 (a whole number), a fraction of the stage's steps when < 1.",
        f"- **name** (recipes, stages): `{STAGE_NAME.pattern}`; it becomes a directory name.",
        "- **`{}`** as a default: the block with every field at its default.",
        "- A schedule is one of several shapes, chosen by its `type`: each has its own table.",
        "- Shorthands: `model: PATH` is `model: {path: PATH}`, `tokenizer: PATH` is `tokenizer: {path: PATH}`,",
        "  and `mixture: NAME` reads `data_mixtures/NAME.yaml` (`{include: NAME, ...}` overrides some of it).",
        "",
        "See [Recipes](../recipes.md) for the format in prose and [Data and mixtures](../data.md),",
        "[Training](../training.md) and [Evaluation](../evaluation.md) for what the fields do.",
    ]
    for section in walk_model(Recipe):
        heading = f"`{section.path}`" if section.path else "Top level"
        out += ["", f"## {heading}" + (f" (`{section.variant}`)" if section.variant else ""), ""]
        if section.doc:
            out += [section.doc, ""]
        out += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{r.path}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.meaning)} |" for r in section.rows]
    return "\n".join(out) + "\n"


def _fixed_width(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=USAGE_WIDTH)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """``{name: (help, parser)}`` of a parser's sub-commands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text with ``%(default)s`` and friends filled in, by argparse itself."""
    return parser._get_formatter()._expand_help(action) if action.help else MISSING


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("+", "*") else "")
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or action.dest.upper()
    value = f"[{metavar} ...]" if action.nargs == "*" else metavar
    return f"`{names} {value}`" + (" (repeatable)" if isinstance(action, argparse._AppendAction) else "")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    value = action.default
    if value is None or value is argparse.SUPPRESS or value == []:
        return MISSING
    return f"`{_value(value)}`"


def _choices(action: argparse.Action) -> str:
    return f" (one of: {', '.join(map(str, action.choices))})" if action.choices is not None else ""


def command_section(parser: argparse.ArgumentParser, help_text: str) -> list[str]:
    _fixed_width(parser)
    out = ["", f"## `{parser.prog}`", ""]
    if parser.description or help_text:
        out += [parser.description or help_text, ""]
    out += ["```", parser.format_usage().strip(), "```"]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        out += ["", f"**{group.title}**", "", "| argument | default | meaning |", "| --- | --- | --- |"]
        out += [f"| {_cell(_argument(a))} | {_cell(_default(a))} | {_cell(_help(parser, a) + _choices(a))} |"
                for a in actions]
    return out


def cli_page() -> str:
    from cpt.cli import build_parser

    parser = _fixed_width(build_parser())
    commands = subcommands(parser)
    out = [
        GENERATED.format(source="cpt.cli.build_parser()"), "",
        "# Command-line reference", "",
        parser.description or "", "",
        "```", parser.format_usage().strip(), "```", "",
        "Every command that reads a recipe prints one `error: <file>: <field>: <message>` line per",
        "problem and exits with code 2; see [Troubleshooting](../troubleshooting.md).", "",
        "| command | what it does |", "| --- | --- |",
    ]
    out += [f"| `cpt {name}` | {_cell(help_text)} |" for name, (help_text, _) in commands.items()]
    for help_text, sub in commands.values():
        out += command_section(sub, help_text)
        for nested_help, nested in subcommands(sub).values():  # e.g. `cpt merge METHOD`
            out += command_section(nested, nested_help)
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """File name -> content of every generated page."""
    return {"cli.md": cli_page(), "recipe.md": recipe_page()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpt.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    parser.add_argument("--dir", type=Path, default=PAGES_DIR, help="where the pages live (default: %(default)s)")
    args = parser.parse_args(argv)
    stale = []
    for name, text in pages().items():
        path = args.dir / name
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for path in stale:
        print(f"stale: {path} (run python -m cpt.docgen)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
