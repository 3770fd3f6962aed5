"""A merge streamed tensor by tensor: each output tensor is computed from the inputs' copies of it,
written, and let go, so memory stays a few copies of the largest tensor whatever the model's size.

The output is a Hugging Face model directory: the primary input's files besides its weights
(config, generation config, tokenizer), and safetensors weights in the primary input's stored
dtypes, computed in float32. It is written into a temporary sibling and renamed into place, so it
is complete or absent.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cpt.errors import CptError
from cpt.io import io_errors, staged_dir
from cpt.merge.checks import check_compatible
from cpt.merge.inputs import Source
from cpt.merge.shards import write_shards
from cpt.paths import check_output_dir

# ``combine(read)`` is one output tensor, where ``read(k)`` gives input k's copy of it in float32.
Combine = Callable[[Callable[[int], torch.Tensor]], torch.Tensor]

DEFAULT_SHARD_BYTES = 2 * 10**9


def merge_models(
    sources: Sequence[Source], combine: Combine, out: Path, *, primary: int = 0, overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write the merge of ``sources`` into ``out``: every floating-point tensor is ``combine``'s,
    cast to the dtype ``sources[primary]`` stores it in; other tensors (integer buffers) are the
    primary input's."""
    check_compatible(sources)
    check_output(Path(out), sources, overwrite)
    main = sources[primary]

    def compute(name: str) -> torch.Tensor:
        dtype = main.specs[name].dtype
        if not dtype.is_floating_point:
            return main.read(name)
        return combine(lambda k: sources[k].read(name).float()).to(dtype)

    with staged_dir(Path(out)) as staging, io_errors(out):
        for path in main.files():
            shutil.copyfile(path, staging / path.name)
        write_shards(staging, main.specs, compute, max_shard_bytes)


def check_output(out: Path, sources: Sequence[Source], overwrite: bool) -> None:
    """``out`` may be new or empty; a full one only with ``overwrite``, and never an input, above one or inside one."""
    check_output_dir(out)
    target = out.resolve()
    for source in sources:
        path = Path(source.name).expanduser().resolve()
        if path == target or target in path.parents or path in target.parents:
            raise CptError(f"would replace the input {source.name}; choose another output directory", str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CptError("already exists and is not empty; pass --overwrite to replace it", str(out))
