"""Reading a recipe: YAML through ``yaml.safe_load`` (tags that build Python objects are refused),
named mixtures from ``data_mixtures/``, ``--set`` overrides, then pydantic validation and the
cross-field checks. Every problem is reported as ``<file>: <field.path>: <message>`` so the CLI
can print one actionable line per problem.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cpt.config.checks import check_recipe
from cpt.config.recipe import STAGE_NAME, Recipe, stage_index
from cpt.errors import CptError, CptErrors
from cpt.paths import read_text


def load_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Read, merge and validate a recipe; raise :class:`CptErrors` listing every problem."""
    path = Path(path)
    return recipe_from_mapping(read_yaml_mapping(path), path, overrides, check_files=check_files)


def recipe_from_mapping(raw: dict[str, Any], path: Path, overrides: list[str] = (), *, check_files: bool = True) -> Recipe:
    """Validate an already-read recipe mapping (changed in place by ``overrides``); ``path`` names it in errors."""
    errors: list[CptError] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except CptError as exc:
            errors.append(CptError(exc.message, f"{path}: --set {item}"))
    for index, stage in enumerate(raw.get("stages") or []):
        if isinstance(stage, dict):
            try:
                _include_mixture(stage, path)
                _ratio_from_fit(stage, path)
            except CptError as exc:
                errors.append(CptError(exc.message, f"{path}: stages.{_stage_label(stage, index)}.mixture"))
    if errors:
        raise CptErrors(errors)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise CptErrors([CptError(msg, f"{path}: {loc}") for loc, msg in _pydantic_problems(exc, raw)]) from None
    problems = check_recipe(recipe, check_files=check_files)
    if problems:
        raise CptErrors([CptError(e.message, f"{path}: {e.where}") for e in problems])
    return recipe


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = read_text(path)
    except CptError as exc:
        raise CptErrors([exc]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CptErrors([CptError(f"invalid YAML: {problem}", where)]) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise CptErrors([CptError(f"a recipe must be a YAML mapping, got {kind}", str(path))])
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=VALUE`` in place; VALUE is YAML; ``null`` removes the key (its default returns).

    Inside ``stages`` the path element after ``stages`` is a stage name, not an index.
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise CptError("expected FIELD.PATH=VALUE")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CptError(f"value is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _stage_by_name(node, part)
            continue
        if not isinstance(node, dict):
            raise CptError(f"{'.'.join(parts[:depth])} is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        raise CptError("a whole stage cannot be replaced; set its fields")
    if not isinstance(node, dict):
        raise CptError(f"{'.'.join(parts[:-1])} is not a mapping")
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def _stage_by_name(stages: list[Any], name: str) -> dict[str, Any]:
    try:
        return stages[stage_index([s.get("name") if isinstance(s, dict) else None for s in stages], name)]
    except CptError as exc:
        raise CptError(exc.message) from None


def mixture_search_path(recipe_path: Path) -> list[Path]:
    here = recipe_path.resolve().parent
    return [here / "data_mixtures", here.parent / "data_mixtures", Path.cwd() / "data_mixtures"]


def _include_mixture(stage: dict[str, Any], recipe_path: Path) -> None:
    """Replace ``mixture: NAME`` / ``mixture: {include: NAME, ...}`` by the named file's mapping."""
    mixture = stage.get("mixture")
    if isinstance(mixture, str):
        mixture = {"include": mixture}
    if not isinstance(mixture, dict) or "include" not in mixture:
        return
    name = mixture.pop("include")
    if not isinstance(name, str) or not STAGE_NAME.match(name):
        raise CptError(f"include must be a mixture name, got {name!r}")
    candidates = [folder / f"{name}.yaml" for folder in mixture_search_path(recipe_path)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CptError(f"no mixture named {name!r} in {', '.join(str(c.parent) for c in candidates)}")
    included = read_yaml_mapping(found)
    stage["mixture"] = {**copy.deepcopy(included), **mixture}


def _ratio_from_fit(stage: dict[str, Any], recipe_path: Path) -> None:
    """Replace ``ratio: {from_fit: FIT.json, tokens: T}`` by the replay share it implies.

    FIT.json is what ``cpt fit --law cmr --json`` printed; the critical mixture ratio R at T
    tokens is the share of the stage's own domains, so the earlier domains replay 1 - R. The
    resolved recipe records the number, not the file.
    """
    mixture = stage.get("mixture")
    if not isinstance(mixture, dict) or "ratio" not in mixture:
        return
    spec = mixture.pop("ratio")
    if not isinstance(spec, dict) or set(spec) != {"from_fit", "tokens"}:
        raise CptError("ratio must be {from_fit: FIT.json, tokens: T}")
    if "replay" in mixture:
        raise CptError("set either ratio or replay, not both")
    candidates = [recipe_path.resolve().parent / str(spec["from_fit"]), Path(str(spec["from_fit"]))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CptError(
            f"ratio.from_fit: {spec['from_fit']} does not exist (looked beside the recipe and in the working directory)"
        )
    try:
        fit = json.loads(found.read_text())
        tokens = float(spec["tokens"])
    except (ValueError, TypeError) as exc:
        raise CptError(f"ratio: cannot read {found}: {exc}") from None
    if not isinstance(fit, dict) or fit.get("law") != "cmr":
        raise CptError(f"ratio.from_fit: {found} is not the JSON of `cpt fit --law cmr --json`")
    from cpt.laws.cmr import cmr_ratio_at

    ratio = cmr_ratio_at(fit, tokens)
    if not ratio > 0:
        raise CptError(
            f"the fit in {found} gives a critical mixture ratio of {ratio:g} at {tokens:g} tokens: no domain data"
        )
    mixture["replay"] = 1.0 - ratio


def _stage_label(stage: Any, index: int) -> str:
    if isinstance(stage, dict) and isinstance(stage.get("name"), str):
        return stage["name"]
    return str(index)


def _pydantic_problems(exc: ValidationError, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Turn pydantic errors into (field path, message), naming stages by name.

    Union and discriminator tags that pydantic inserts into locations are dropped by walking
    the raw data alongside the location.
    """
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        parts: list[str] = []
        node: Any = raw
        for item in err["loc"]:
            if isinstance(node, list) and isinstance(item, int) and item < len(node):
                parts.append(_stage_label(node[item], item) if parts == ["stages"] else str(item))
                node = node[item]
            elif isinstance(node, dict) and item in node:
                parts.append(str(item))
                node = node[item]
            elif isinstance(node, dict) and item != node.get("type"):
                parts.append(str(item))
                node = None
            # otherwise a discriminator tag that pydantic inserts: skip it
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        entry = (".".join(parts) or "<recipe>", message)
        if entry not in problems:
            problems.append(entry)
    return problems


# ----------------------------------------------------------------------------- semantic checks
