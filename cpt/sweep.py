"""`cpt sweep`: run one stage of a recipe at several domain ratios and tabulate the losses.

The domain ratio R is the share of the stage's tokens drawn from its own domains; the rest,
1 - R, replays the earlier stages' domains (the "general" data). As in the CMR paper (Gu et al.
2024) every run keeps a constant lr after warmup unless ``--keep-schedule`` is given, so one run
per ratio yields every token budget: it is evaluated when each budget is reached.

Layout of ``DIR``: ``base/`` trains the stages before the swept one once; ``ratio-<R>/`` is a
normal run directory per ratio whose earlier stages link to ``base/``; ``sweep.csv`` has one row
per (ratio, budget). Finished ratios are skipped, unfinished ones resumed.
"""

from __future__ import annotations

import copy
import csv
import math
import os
from pathlib import Path
from typing import Any

from cpt.config.load import apply_override, read_yaml_mapping, recipe_from_mapping
from cpt.config.recipe import Recipe, dump_recipe, stage_index
from cpt.errors import CptError
from cpt.io import staged_dir, write_text, write_with
from cpt.lock import hold
from cpt.paths import check_output_dir
from cpt.train.metrics import eval_records, read_metrics


def sweep_recipes(raw: dict[str, Any], path: Path, stage_name: str, ratios: list[float], budgets: list[int] | None,
                  keep_schedule: bool, replay_shares: dict[str, float] | None = None) -> dict[float, Recipe]:
    """The recipe of each ratio: stages up to the swept one, its mixture set to the ratio."""
    index = swept_stage([s.get("name") for s in raw.get("stages") or []], stage_name, ratios)
    recipes = {}
    for ratio in ratios:
        mapping = copy.deepcopy(raw)
        mapping["stages"] = mapping["stages"][: index + 1]
        stage = mapping["stages"][index]
        if ratio > 0:
            stage["mixture"] = {"replay": 1.0 - ratio}
        else:  # only general data: the earlier stage's mixture written out as weights
            if not replay_shares:
                raise CptError("ratio 0 needs the earlier stage's planned mixture", "--ratios")
            stage["mixture"] = {"weights": replay_shares}
        if not keep_schedule:
            schedule = stage.get("schedule") or {}
            stage["schedule"] = {"type": "constant", "lr": schedule.get("lr"), "warmup": schedule.get("warmup", 0.01)}
        if budgets:
            tokens_per_step = stage["batch"]["global_batch_size"] * stage["seq_len"]
            stage.pop("tokens", None)
            stage["steps"] = math.ceil(max(budgets) / tokens_per_step)
            evaluation = stage.setdefault("evaluation", {})
            evaluation["at_tokens"] = sorted(budgets)
            evaluation["every"] = 0
        recipes[ratio] = recipe_from_mapping(mapping, path)
    return recipes


def swept_stage(names: list, stage_name: str, ratios: list[float]) -> int:
    """The index of the swept stage; CptError for an unknown or first stage or a ratio outside [0, 1]."""
    try:
        index = stage_index(names, stage_name)
    except CptError as exc:
        raise CptError(exc.message, "--stage") from None
    if index == 0:
        raise CptError("the swept stage needs an earlier stage: its domains are the general data to replay", "--stage")
    outside = [r for r in ratios if not 0 <= r <= 1]
    if outside:
        raise CptError(f"ratios must lie in [0, 1], got {outside[0]:g}", "--ratios")
    return index


def run_sweep(recipe_path: Path, overrides: list[str], stage_name: str, ratios: list[float], budgets: list[int] | None,
              output_dir: Path | None, keep_schedule: bool = False) -> Path | None:
    """Train what is missing and write ``sweep.csv``; returns its path, or None when a stop
    request (SIGTERM, Ctrl-C) ended a run early: the same command then resumes the sweep."""
    from cpt.plan import plan_recipe
    from cpt.train.run import RunOptions, run

    raw = read_yaml_mapping(recipe_path)
    for item in overrides:
        try:
            apply_override(raw, item)
        except CptError as exc:
            raise CptError(exc.message, f"{recipe_path}: --set {item}") from None
    recipe = recipe_from_mapping(copy.deepcopy(raw), recipe_path)
    index = swept_stage([s.name for s in recipe.stages], stage_name, ratios)  # before anything is written
    out = Path(output_dir or Path(recipe.output_dir).with_name(f"{recipe.name}-sweep-{stage_name}"))
    check_output_dir(out)
    with hold(out):  # one live sweep per directory
        if pin_tokenizers(raw, recipe, out / "tokenizers"):
            recipe = recipe_from_mapping(copy.deepcopy(raw), recipe_path)
        base = recipe.model_copy(update={"stages": recipe.stages[:index]})
        previous = plan_recipe(base)[-1]
        blocks = previous.planned_blocks()
        shares = {d: float(n) / float(blocks.sum()) for d, n in zip(previous.domains, blocks)}
        recipes = sweep_recipes(raw, recipe_path, stage_name, ratios, budgets, keep_schedule, shares)
        out.mkdir(parents=True, exist_ok=True)
        base_dir = out / "base"
        if not _run_dir(base, base_dir, run, RunOptions):
            return None
        for ratio, ratio_recipe in recipes.items():
            run_dir = out / f"ratio-{ratio:g}"
            if (run_dir / stage_name / "final" / "config.json").is_file():
                continue
            if not (run_dir / "recipe.yaml").is_file():
                run_dir.mkdir(parents=True, exist_ok=True)
                for earlier in base.stages:
                    link = run_dir / earlier.name
                    if not link.exists():
                        os.symlink(os.path.relpath(base_dir / earlier.name, run_dir), link)
            if not _run_dir(ratio_recipe, run_dir, run, RunOptions, claim=True):
                return None
        table = out / "sweep.csv"
        write_table(collect_rows(out, recipes, stage_name), table)
        return table


def pin_tokenizers(raw: dict[str, Any], recipe: Recipe, where: Path) -> bool:
    """Replace every ``tokenizer: {train: ...}`` of ``raw`` by the path of that tokenizer, trained
    on the whole recipe and saved under ``where``; True when anything was replaced.

    A trained tokenizer depends on every domain of its recipe, and the base run holds only the
    stages before the swept one: without pinning it would train on fewer domains and get a
    vocabulary that the ratio runs do not share.
    """
    from cpt.plan import trained_tokenizer

    pinned = False
    for mapping, stage in zip(raw["stages"], recipe.stages):
        if stage.tokenizer is None or stage.tokenizer.train is None:
            continue
        target = where / stage.name
        if not (target / "tokenizer.json").is_file():
            with staged_dir(target) as staging:
                trained_tokenizer(recipe, stage.tokenizer.train).save_pretrained(staging)
        extend = stage.tokenizer.extend  # extended from the pinned base, as from the trained one
        mapping["tokenizer"] = {"path": str(target.resolve())}
        if extend is not None:
            mapping["tokenizer"]["extend"] = extend.model_dump(mode="json")
        pinned = True
    return pinned


def _run_dir(recipe: Recipe, run_dir: Path, run, options, claim: bool = False) -> bool:
    """Train ``recipe`` into ``run_dir`` (resuming whatever is there) through ``cpt run``'s own
    path; False when it was stopped before its last stage finished."""
    recipe_file = run_dir.with_name(run_dir.name + ".yaml")
    text = dump_recipe(recipe)
    write_text(recipe_file, text)
    if claim and not (run_dir / "recipe.yaml").is_file():
        write_text(run_dir / "recipe.yaml", text)
    argv = ["run", str(recipe_file), "--output-dir", str(run_dir), "--resume"]
    code = run(recipe, options(run_dir, resume=True, argv=tuple(argv)), argv)
    if code != 0:
        raise CptError(f"the run in {run_dir} failed (exit {code}); run the sweep again to resume it", "sweep")
    return (run_dir / recipe.stages[-1].name / "final" / "config.json").is_file()


def collect_rows(out: Path, recipes: dict[float, Recipe], stage_name: str) -> list[dict[str, Any]]:
    rows = []
    for ratio, recipe in recipes.items():
        stage = recipe.stage(stage_name)
        run_dir = out / f"ratio-{ratio:g}"
        evals = eval_records(read_metrics(run_dir / stage_name / "metrics.jsonl"))
        targeted = list(stage.data)
        params = count_params(run_dir / stage_name / "final")
        budgets = stage.evaluation.at_tokens
        wanted = {math.ceil(t / stage.tokens_per_step) for t in budgets} if budgets else None
        base = evals[0]
        for record in evals[1:]:
            if wanted is not None and record["step"] not in wanted:
                continue
            losses = {k.split("/")[1]: float(v) for k, v in record.items() if k.startswith("eval/") and k.endswith("/loss")}
            base_losses = {k.split("/")[1]: float(v) for k, v in base.items() if k.startswith("eval/") and k.endswith("/loss")}
            general = [d for d in losses if d not in targeted]
            rows.append({
                "ratio": ratio,
                "tokens": record["tokens"],
                "general_loss": _mean(losses, general),
                "domain_loss": _mean(losses, targeted),
                "params": params,
                **{f"loss/{d}": v for d, v in losses.items()},
                "base_general_loss": _mean(base_losses, general),
                "base_domain_loss": _mean(base_losses, targeted),
                **{f"base_loss/{d}": v for d, v in base_losses.items()},
            })
    return rows


def _mean(losses: dict[str, float], names: list[str]) -> float:
    present = [losses[d] for d in names if d in losses]
    return sum(present) / len(present) if present else math.nan


def count_params(model_dir: Path) -> int:
    """Parameters of an exported model, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    write_with(path, write)
