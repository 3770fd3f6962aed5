"""`cpt anneal`: fork a decay branch from a checkpoint of a constant-lr (WSD / infinite) run.

This is how release models come out of a run that has no fixed end (Hagele et al. 2024; Ibrahim
et al. 2024): the main branch goes on untouched, and any of its checkpoints can be cooled down
into a deployable model. The branch continues the checkpoint exactly — weights, AdamW moments,
RNG and the data position — and by default keeps the main branch's mixture at that step and
decays the lr from the value the main branch had reached, with the 1-sqrt shape over all of its
steps. ``--set`` changes the branch like a stage (paths relative to the stage), for example
``--set 'mixture={weights: {code: 0.5, prose: 0.5}}'`` for domain upsampling during the decay.

The branch lives in ``<run>/<stage>/anneal-<checkpoint>/`` with its own ``branch.yaml``,
``metrics.jsonl``, ``checkpoints/`` and ``final/``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cpt.config.load import read_yaml_mapping, recipe_from_mapping
from cpt.config.recipe import dump_recipe, stage_index
from cpt.errors import CptError
from cpt.io import claim_dir
from cpt.lock import FILES as LOCK_FILES
from cpt.plan import plan_recipe, plan_stage
from cpt.train import checkpoint
from cpt.train.checkpointer import Fork
from cpt.train.job import start_job
from cpt.train.launch import distributed_context
from cpt.train.run import fork_stage
from cpt.train.schedules import lr_at


def anneal(stage_dir: Path, from_checkpoint: str, steps: int, overrides: list[str], argv: list[str], *,
           resume: bool = False, overwrite: bool = False) -> int:
    stage_dir = Path(stage_dir)
    run_dir, name = stage_dir.parent, stage_dir.name
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise CptError(f"{run_dir} is not a cpt run directory (no recipe.yaml)", str(stage_dir))
    ckpt = stage_dir / "checkpoints" / from_checkpoint
    at = checkpoint.read_meta(ckpt)["step"]  # a complete checkpoint, or a clear error
    main = recipe_from_mapping(read_yaml_mapping(recipe_path), recipe_path)
    try:
        index = stage_index([s.name for s in main.stages], name)
    except CptError as exc:
        raise CptError(exc.message, str(stage_dir)) from None
    prefixed = [f"stages.{name}.{item}" for item in overrides]
    recipe_from_mapping(read_yaml_mapping(recipe_path), recipe_path, prefixed)  # a bad --set fails before any planning
    main_plans = plan_recipe(main)[: index + 1]
    main_plan = main_plans[-1]

    raw = read_yaml_mapping(recipe_path)  # all stages stay: the branch is evaluated on every domain of the recipe
    branch_stage = raw["stages"][index]
    branch_stage.pop("tokens", None)
    branch_stage.update(
        steps=steps,
        schedule={"type": "wsd", "lr": lr_at(main_plan.stage.schedule, min(at, main_plan.steps - 1), main_plan.steps),
                  "warmup": 0, "decay": steps, "decay_type": "1-sqrt"},
        mixture={"weights": dict(zip(main_plan.domains, main_plan.weights[min(at, main_plan.steps - 1)].tolist()))},
        checkpoint={"every": None, "keep": 1},
    )
    recipe = recipe_from_mapping(raw, recipe_path, prefixed)
    branch = recipe.stages[index]
    out = stage_dir / f"anneal-{from_checkpoint}"

    branch_yaml = yaml.safe_dump(yaml.safe_load(dump_recipe(recipe))["stages"][index], sort_keys=False)

    def work(_) -> int:
        plan = plan_stage(recipe, branch, main_plan.tokenizer, main_plans[-2] if index else None)
        finished = fork_stage(recipe, plan, index, Fork(ckpt, main_plan.domains), out, resume)
        if distributed_context().is_main:
            print(f"{'done' if finished else 'stopped'}: {out}", flush=True)
        return 0

    return start_job(
        out, recipe.distributed, argv,
        claim=lambda: claim_dir(out, "branch.yaml", branch_yaml, resume=resume, overwrite=overwrite, keep=LOCK_FILES),
        prepare=lambda: None, work=work,
    )
