"""`cpt eval MODEL_DIR --recipe RECIPE`: measure any Hugging Face model the way training does.

The same held-out blocks and harness tasks as a run's evaluations during training, so the
numbers of a model trained elsewhere (or of the base model itself) compare directly with a
run's ``metrics.jsonl``. Runs in one process, on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cpt.errors import CptError, first_line
from cpt.paths import local_dir, read_text


def add_eval_parser(commands) -> None:
    sub = commands.add_parser(
        "eval", help="Evaluate a Hugging Face model on a recipe's held-out domains and harness tasks.",
        description="Evaluate a Hugging Face model on a recipe's held-out domains and harness tasks.",
    )
    sub.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model directory (e.g. RUN/STAGE/final)")
    sub.add_argument("--recipe", type=Path, required=True, help="the recipe whose domains and tasks to use")
    sub.add_argument("--stage", metavar="NAME", help="the stage whose seq_len and evaluation settings apply (default: the last)")
    sub.add_argument(
        "--tasks", nargs="*", metavar="TASK",
        help="harness tasks instead of the stage's (names or task YAML paths); give none to skip the harness",
    )
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a recipe field, as for cpt run")
    sub.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_eval(args: argparse.Namespace) -> int:
    from cpt.config.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    result = evaluate_model(args.model_dir, recipe, args.stage, args.tasks)
    if args.json:
        from cpt.train.metrics import jsonable

        print(json.dumps(jsonable(result), allow_nan=False))
        return 0
    print(f"{'domain':<20}{'loss':>10}{'ppl':>12}")
    for name, scores in result["domains"].items():
        print(f"{name:<20}{scores['loss']:>10.4f}{scores['ppl']:>12.2f}")
    for task, metrics in result["harness"].items():
        print(f"{task}: " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    print(f"evaluated in {result['seconds']:.1f} s")
    return 0


def evaluate_model(model_dir: str, recipe, stage_name: str | None, tasks: list[str] | None) -> dict[str, Any]:
    """``{"domains": {d: {"loss", "ppl"}}, "harness": {task: {metric: value}}, "seconds"}``."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt.data.tokenizer import load_tokenizer
    from cpt.eval.heldout import heldout_losses, heldout_sets, perplexity
    from cpt.eval.tasks import resolve_tasks, run_harness
    from cpt.plan import stage_tokenizer
    from cpt.train.model import set_attention

    stage = recipe.stage(stage_name) if stage_name else recipe.stages[-1]
    local = local_dir(model_dir, "eval")
    if local is not None:
        if not (local / "config.json").is_file():
            raise CptError(f"{model_dir} is not a Hugging Face model directory (no config.json)", "eval")
        read_text(local / "config.json")  # an unreadable one fails now, not after the tokenizer is built
    started = time.perf_counter()
    if local is not None and ((local / "tokenizer.json").is_file() or (local / "tokenizer_config.json").is_file()):
        tokenizer = load_tokenizer(str(local))
    else:  # a bare weights directory: the tokenizer the recipe would use for that stage
        tokenizer = None
        for candidate in recipe.stages:
            tokenizer = stage_tokenizer(recipe, candidate, tokenizer)
            if candidate is stage:
                break
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=stage.trust_remote_code)
    except OSError as exc:
        raise CptError(f"cannot load a model from {model_dir}: {first_line(exc)}", "eval") from None
    set_attention(model, stage.attn_implementation, f"stages.{stage.name}.attn_implementation",
                  asked="attn_implementation" in stage.model_fields_set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    cfg, cache = stage.evaluation, recipe.resolved_cache_dir()
    sets = heldout_sets(recipe.domains(), tokenizer, stage.seq_len, recipe.seed, cache / "blocks", cfg.max_tokens_per_domain)
    losses = heldout_losses(model, sets, cfg.batch_size or stage.batch.micro_batch_size, device,
                            document_masking=stage.document_masking)
    names = cfg.harness.tasks if tasks is None else tasks
    harness = {}
    if names:
        resolved = resolve_tasks(names, recipe.domains(), recipe.seed, cache / "harness", cfg.harness.limit)
        harness = run_harness(model, tokenizer, resolved, device=device, limit=cfg.harness.limit,
                              batch_size=cfg.harness.batch_size, num_fewshot=cfg.harness.num_fewshot,
                              document_masking=stage.document_masking)
    return {
        "domains": {d: {"loss": loss, "ppl": perplexity(loss)} for d, loss in losses.items()},
        "harness": harness,
        "seconds": time.perf_counter() - started,
    }
