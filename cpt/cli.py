"""The `cpt` command: one sub-command per user verb, each a thin layer over the library."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from cpt.errors import CptError, CptErrors
from cpt.eval.command import add_eval_parser, cmd_eval
from cpt.laws.command import add_fit_parser, cmd_fit
from cpt.merge.command import add_merge_parser, cmd_merge
from cpt.paths import check_output_dir, check_output_file
from cpt.report import add_report_parsers, cmd_compare, cmd_report


class _Parser(argparse.ArgumentParser):
    """Usage mistakes (a missing argument, ``--steps two``) as one ``error: cpt <command>: ...``
    line like every other bad input, instead of argparse's usage block; sub-parsers inherit it."""

    def error(self, message: str):
        raise CptError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cpt", description="Continual pre-training of Hugging Face language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("recipe", type=Path, help="recipe YAML file")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
            help="override a recipe field, e.g. stages.cpt.steps=50 (VALUE is YAML; null restores the default)",
        )
        return sub

    recipe_command("validate", "Check a recipe and print it fully resolved.")
    plan = recipe_command("plan", "Show steps, tokens, mixture and lr of every stage, without training.")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    plan.add_argument("--png", type=Path, metavar="PATH", help="also draw lr and mixture over each stage")
    prepare = recipe_command("prepare", "Tokenize and pack every domain the recipe reads, without training.")
    prepare.add_argument("--workers", type=_positive, metavar="N", help="worker processes (default: the usable cores)")
    prepare.add_argument("--shard", type=_shard, metavar="I/N", help="prepare only share I of N of each domain (0-based), e.g. one "
                         "task of a Slurm array; a final run without --shard stitches the shards")
    run = recipe_command("run", "Train every stage of a recipe (resumable; starts its own processes when asked to).")
    run.add_argument("--output-dir", type=Path, help="run directory (default: the recipe's output_dir)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run from its latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")

    anneal = commands.add_parser(
        "anneal", help="Fork a decay branch (a release model) from a checkpoint of a run's stage.",
        description="Fork a decay branch from a checkpoint; the main branch is left untouched.",
    )
    anneal.add_argument("stage_dir", type=Path, metavar="RUN_DIR/STAGE", help="the stage directory of a run")
    anneal.add_argument("--from", dest="from_checkpoint", required=True, metavar="step-N", help="checkpoint to branch from")
    anneal.add_argument("--steps", type=int, required=True, metavar="K", help="length of the decay branch in steps")
    anneal.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="change the branch like a stage, e.g. schedule.decay_type=linear or 'mixture={weights: {code: 1}}'",
    )
    branch_mode = anneal.add_mutually_exclusive_group()
    branch_mode.add_argument("--resume", action="store_true", help="continue an interrupted branch")
    branch_mode.add_argument("--overwrite", action="store_true", help="replace an existing branch directory")

    export = commands.add_parser("export", help="Convert a training checkpoint into a Hugging Face model directory.")
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR", help="e.g. runs/x/cpt/checkpoints/step-100")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new directory for the HF model")

    add_eval_parser(commands)
    add_report_parsers(commands)
    add_fit_parser(commands)
    add_merge_parser(commands)

    sweep = recipe_command("sweep", "Run one stage at several domain ratios and tabulate losses per token budget.")
    sweep.add_argument("--stage", required=True, metavar="NAME", help="the stage to sweep (it needs an earlier stage)")
    sweep.add_argument("--ratios", required=True, type=_numbers(float), metavar="R1,R2,...",
                       help="shares of the stage's own domains, e.g. 0,0.1,0.25,0.5,0.75,1")
    sweep.add_argument("--tokens", type=_numbers(int), metavar="T1,T2,...",
                       help="token budgets to evaluate at (default: the stage's length and evaluation steps)")
    sweep.add_argument("--output-dir", type=Path, help="sweep directory (default: beside the recipe's output_dir)")
    sweep.add_argument("--keep-schedule", action="store_true",
                       help="train with the stage's schedule instead of a constant lr after its warmup")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _shard(text: str):
    from cpt.data.parallel import Shard

    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _numbers(kind):
    """An argparse type for comma-separated numbers (1e6 allowed for integers)."""

    def parse(text: str) -> list:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if kind is int:
            if any(v != int(v) or v <= 0 for v in values):
                raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
            values = [int(v) for v in values]
        if not values:
            raise argparse.ArgumentTypeError("expected at least one number")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace()
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # `cpt run` hands the same arguments to the processes it launches
        return COMMANDS[args.command](args)
    except CptErrors as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
    except CptError as exc:
        print(f"error: {_with_recipe(exc, getattr(args, 'recipe', None))}", file=sys.stderr)
    except OSError as exc:  # a failed read or write that no module turned into a CptError
        print(f"error: {exc.filename or 'I/O'}: {exc.strerror or exc}", file=sys.stderr)
    return 2


def _with_recipe(exc: CptError, recipe: str | None) -> str:
    """A field path (``stages.cpt.batch``) is named with its recipe file; a path names itself."""
    if recipe is None or str(exc).startswith(str(recipe)) or "/" in exc.where.split(": ")[0]:
        return str(exc)
    return f"{recipe}: {exc}"


def cmd_validate(args: argparse.Namespace) -> int:
    from cpt.config.load import load_recipe
    from cpt.config.recipe import dump_recipe

    print(dump_recipe(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from cpt.config.load import load_recipe
    from cpt.plan import plan_recipe, vocabulary_report, write_plan_png
    from cpt.prepare import builtin_builds, builtin_lines

    recipe = load_recipe(args.recipe, args.overrides)
    if args.png:
        check_output_file(args.png, "--png")
    plans = plan_recipe(recipe)
    if args.png:
        write_plan_png(plans, args.png)
    vocabularies = [vocabulary_report(recipe, p) for p in plans]
    if args.json:
        stages = [p.to_json() | ({"vocabulary": v} if v else {}) for p, v in zip(plans, vocabularies)]
        print(json.dumps({"stages": stages, "builtin": builtin_builds(recipe)}))
        return 0
    for line in builtin_lines(recipe):
        print(f"data {line}")
    for plan, vocabulary in zip(plans, vocabularies):
        stage = plan.stage
        print(
            f"stage {plan.name}: {plan.steps:,} steps x {stage.batch.global_batch_size} sequences x "
            f"{stage.seq_len} tokens = {plan.tokens:,} tokens; schedule {stage.schedule.type}, "
            f"lr {plan.lr.max():.3g} peak, {plan.lr[-1]:.3g} last"
        )
        print(f"  {'domain':<16}{'weight first->last':>20}{'planned tokens':>16}{'available':>14}{'epochs':>8}")
        epochs = plan.epochs()
        for i, (domain, tokens) in enumerate(plan.tokens_per_domain().items()):
            available = len(plan.blocks[domain]) * stage.seq_len
            first, last = plan.weights[0, i], plan.weights[-1, i]
            print(f"  {domain:<16}{first:>10.3f} -> {last:<7.3f}{tokens:>16,}{available:>14,}{epochs[domain]:>8.2f}")
        if plan.conditioned():
            on = int(plan.metadata.sum())
            print(f"  metadata ({', '.join(plan.conditioned())}): on for {on:,} steps, off for {plan.steps - on:,} "
                  "(plain text)")
        if stage.document_masking:
            print(f"  document masking: on ({stage.attn_implementation})")
        if vocabulary:
            _print_vocabulary(vocabulary)
    if args.png:
        print(f"wrote {args.png}")
    return 0


def _print_vocabulary(vocabulary: dict) -> None:
    """The extended vocabulary's sizes and its compression gain per domain (base / extended tokens)."""
    print(f"  vocabulary: {vocabulary['base_size']:,} + {vocabulary['added']:,} new tokens = {vocabulary['size']:,} "
          f"(init {vocabulary['init']})")
    print(f"  {'domain':<16}{'base tokens/doc':>18}{'extended tokens/doc':>22}{'gain':>8}")
    for domain, c in vocabulary["compression"].items():
        print(f"  {domain:<16}{c['base']:>18,.1f}{c['extended']:>22,.1f}{c['gain']:>8.3f}")


def cmd_prepare(args: argparse.Namespace) -> int:
    import logging

    from cpt.config.load import load_recipe
    from cpt.prepare import builtin_lines, describe, prepare_recipe

    shard = args.shard
    recipe = load_recipe(args.recipe, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for line in builtin_lines(recipe):
        print(line)
    prepared = prepare_recipe(recipe, args.workers, shard)
    for item in prepared:
        print(describe(item))
    if shard is not None:
        print(f"shard {shard.index}/{shard.count} done; when every shard is, `cpt prepare {args.recipe}` stitches them")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cpt.config.load import load_recipe
    from cpt.train.run import RunOptions, run

    recipe = load_recipe(args.recipe, args.overrides)
    opts = RunOptions(args.output_dir or Path(recipe.output_dir), resume=args.resume, overwrite=args.overwrite,
                      argv=tuple(args.argv))
    return run(recipe, opts, args.argv)


def cmd_anneal(args: argparse.Namespace) -> int:
    from cpt.train.anneal import anneal

    if args.steps < 1:
        raise CptError(f"--steps must be >= 1, got {args.steps}", "anneal")
    return anneal(args.stage_dir, args.from_checkpoint, args.steps, args.overrides, args.argv,
                  resume=args.resume, overwrite=args.overwrite)


def cmd_export(args: argparse.Namespace) -> int:
    from cpt.train.export import export_checkpoint

    if args.out_dir.exists():
        raise CptError(f"{args.out_dir} already exists; choose a new directory", "export")
    check_output_dir(args.out_dir)
    export_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cpt.sweep import run_sweep

    table = run_sweep(args.recipe, args.overrides, args.stage, args.ratios, args.tokens, args.output_dir,
                      keep_schedule=args.keep_schedule)
    if table is None:
        print("sweep stopped; the same command resumes it", file=sys.stderr)
    else:
        print(f"wrote {table}")
    return 0


COMMANDS = {
    "validate": cmd_validate, "plan": cmd_plan, "prepare": cmd_prepare, "run": cmd_run, "anneal": cmd_anneal, "export": cmd_export,
    "eval": cmd_eval, "sweep": cmd_sweep, "report": cmd_report, "compare": cmd_compare,
    "fit": cmd_fit, "merge": cmd_merge,
}


def console() -> int:
    """The ``cpt`` executable (and ``python -m cpt.cli``, which every launched rank runs): :func:`main`,
    then the objects alive at exit are moved out of the garbage collector's reach. Its final sweeps
    over everything torch and transformers allocated cost about 2 s of CPU at every process exit;
    memory is freed by reference counts all the same."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console())
