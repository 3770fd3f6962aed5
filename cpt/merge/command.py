"""`cpt merge METHOD`: model arithmetic on Hugging Face model directories and cpt checkpoints."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from cpt.errors import CptError

if TYPE_CHECKING:
    from cpt.merge.stream import Combine

WHERE = "merge"
MODEL_HELP = "a Hugging Face model directory (safetensors) or a cpt checkpoint (checkpoints/step-N)"


def add_merge_parser(commands) -> argparse.ArgumentParser:
    """Add `cpt merge` and its methods to the sub-parsers of the `cpt` command."""
    text = "Merge models of one architecture tensor by tensor: average, interpolate, add an instruction residual."
    merge = commands.add_parser("merge", help=text, description=text)
    methods = merge.add_subparsers(dest="method", required=True, metavar="METHOD", help="how to combine the models")
    average = _method(methods, "average", "The uniform or weighted average of several checkpoints of one run.")
    average.add_argument("inputs", nargs="+", metavar="MODEL", help=f"two or more, each {MODEL_HELP}")
    average.add_argument("--weights", metavar="W1,W2,...",
                         help="relative weights, one per MODEL, >= 0 (default: equal); divided by their sum")
    for name, text in (("linear", "(1 - alpha) * A + alpha * B, tensor by tensor."),
                       ("slerp", "Spherical interpolation from A (alpha 0) to B (alpha 1), tensor by tensor.")):
        sub = _method(methods, name, text)
        sub.add_argument("inputs", nargs=2, metavar="MODEL", help=f"A then B, each {MODEL_HELP}")
        sub.add_argument("--alpha", type=float, required=True, metavar="ALPHA", help="share of B, in [0, 1]")
    residual = _method(methods, "residual", "C + (I - B): the instruction residual of I over its base B, added to C.")
    residual.add_argument("--base", required=True, metavar="B", help="the base model that I was instruction-tuned from")
    residual.add_argument("--instruct", required=True, metavar="I", help="the instruction-tuned model")
    residual.add_argument("--onto", required=True, metavar="C",
                          help="the model to add the residual to (e.g. B continually pre-trained); its files are kept")
    return merge


def _method(methods, name: str, text: str) -> argparse.ArgumentParser:
    sub = methods.add_parser(name, help=text, description=text)
    sub.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new Hugging Face model directory")
    sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    sub.add_argument("--max-shard-gb", type=float, default=2.0, metavar="GB",
                     help="largest weights file; more weights go into numbered shards (default: %(default)g)")
    return sub


def cmd_merge(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise CptError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}", WHERE)
    names, combine = _formula(args)

    # torch and the readers load only when `cpt merge` runs, not for every `cpt` command.
    from cpt.merge.inputs import open_input
    from cpt.merge.stream import merge_models

    sources = [open_input(name) for name in names]
    merge_models(sources, combine, args.out, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 1e9))
    print(f"wrote {args.out}")
    return 0


def _formula(args: argparse.Namespace) -> tuple[list[str], Combine]:
    """The inputs in order (the first one's dtypes and files are kept) and the formula on them."""
    from cpt.merge import arithmetic

    if args.method == "average":
        if len(args.inputs) < 2:
            raise CptError("average needs at least two models", WHERE)
        weights = _weights(args.weights, len(args.inputs))
        return args.inputs, lambda read: arithmetic.weighted_sum((w, read(k)) for k, w in enumerate(weights))
    if args.method in ("linear", "slerp"):
        alpha = args.alpha
        if not 0 <= alpha <= 1:  # also refuses nan
            raise CptError(f"--alpha must be in [0, 1], got {alpha}", WHERE)
        interpolate = {"linear": arithmetic.linear, "slerp": arithmetic.slerp}[args.method]
        return args.inputs, lambda read: interpolate(read(0), read(1), alpha)
    return [args.onto, args.base, args.instruct], lambda read: arithmetic.residual(read(0), read(1), read(2))


def _weights(text: str | None, count: int) -> list[float]:
    """``--weights`` divided by their sum (equal weights without it)."""
    if text is None:
        return [1 / count] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise CptError(f"--weights expects comma-separated numbers, got {text!r}", WHERE) from None
    if len(weights) != count:
        raise CptError(f"--weights has {len(weights)} numbers for {count} models", WHERE)
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise CptError(f"--weights must be finite and >= 0, got {text}", WHERE)
    total = sum(weights)
    if total == 0:
        raise CptError("--weights sum to 0", WHERE)
    return [w / total for w in weights]
