"""Safetensors weights written as their tensors are computed, one tensor in memory at a time.

Every tensor's dtype and shape is known before any is computed, so each file's header (an
8-byte little-endian length, then JSON naming each tensor's dtype, shape and byte range;
https://huggingface.co/docs/safetensors) is written first and the tensors' bytes are appended in
order. No shard is ever assembled in memory. Shards are named and indexed as ``save_pretrained``
names them, so transformers loads the directory as it loads its own.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from cpt.merge.inputs import Spec
from cpt.train.partitioned import DTYPES

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def plan_shards(specs: dict[str, Spec], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    return shards


def header(specs: dict[str, Spec]) -> bytes:
    """The length and header of a safetensors file holding ``specs`` in order; the header is padded
    with spaces to a multiple of 8 bytes, as the safetensors library does, so the data is aligned."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        entries[name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shards(out_dir: Path, specs: dict[str, Spec], compute: Callable[[str], torch.Tensor], max_bytes: int) -> None:
    """Write the tensors ``specs`` lists, each one ``compute(name)`` made when its turn comes, into
    ``model.safetensors`` or, beyond ``max_bytes``, numbered shards and their index."""
    plan = plan_shards(specs, max_bytes)
    count = len(plan)
    files = [SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for file, names in zip(files, plan):
        with open(out_dir / file, "wb") as f:
            f.write(header({name: specs[name] for name in names}))
            for name in names:
                _append(f, name, compute(name), specs[name])
    if count > 1:
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs.values())},
                 "weight_map": {name: file for file, names in zip(files, plan) for name in names}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _append(f: BinaryIO, name: str, tensor: torch.Tensor, spec: Spec) -> None:
    """Write ``tensor``'s bytes; a function of its own so that the tensor is let go before the next
    one is computed (a loop variable would keep it alive meanwhile)."""
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{name}: computed {tensor.dtype} {list(tensor.shape)}, the header says {spec}")
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
