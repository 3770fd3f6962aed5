"""Loading a safetensors checkpoint straight into ZeRO-3 partitions: each rank reads only its part.

transformers' own ZeRO-3 loading has rank 0 read the whole checkpoint (memory-mapped, so the
pages it touches count towards its resident memory) and scatter each layer from there. Here every
rank reads, with plain file reads, exactly the elements of each weight that its ZeRO-3 partition
holds, so no process ever holds more than its share of the model plus one partition in flight.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw data (https://huggingface.co/docs/safetensors).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from cpt.errors import CptError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    def __init__(self, path: Path, data_start: int, meta: dict):
        self.path = path
        self.dtype = DTYPES[meta["dtype"]]
        self.shape = tuple(meta["shape"])
        self.offset = data_start + meta["data_offsets"][0]

    def read(self, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened tensor, read from disk."""
        out = torch.empty(count, dtype=self.dtype)
        view = memoryview(out.view(torch.uint8).numpy())
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * out.element_size())
            if f.readinto(view) != len(view):
                raise CptError(f"{self.path} ends inside a tensor: the file is truncated", "model")
        return out


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded or not); empty when it has none."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def read_index(files: list[Path]) -> dict[str, Entry]:
    """Every tensor of ``files`` by name, from their headers alone."""
    entries: dict[str, Entry] = {}
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        entries.update({name: Entry(path, 8 + length, meta) for name, meta in header.items()})
    return entries


def match_names(model: torch.nn.Module, entries: dict[str, Entry]) -> dict[str, str] | None:
    """Checkpoint name of each of the model's weights and persistent buffers (shared weights once),
    allowing for a checkpoint saved with or without the base model's prefix; None when one has none."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    persistent = set(model.state_dict(keep_vars=True))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers() if n in persistent]
    found = {}
    for name in names:
        for candidate in (name, name.removeprefix(prefix), prefix + name):
            if candidate in entries:
                found[name] = candidate
                break
        else:
            if name in dict(model.named_parameters()):
                return None
    return found


def load_partitions(model: torch.nn.Module, entries: dict[str, Entry], names: dict[str, str]) -> None:
    """Fill every ZeRO-3 partition of ``model`` (and its whole buffers) from the checkpoint."""
    import deepspeed

    with torch.no_grad():
        for name, p in model.named_parameters():
            entry = entries[names[name]]
            if entry.shape != tuple(p.ds_shape):
                raise CptError(f"{name} has shape {list(entry.shape)} in the checkpoint, {list(p.ds_shape)} in its config",
                               "model")
            shard = p.ds_tensor
            rank = deepspeed.comm.get_rank(group=p.ds_process_group)
            start = rank * shard.numel()
            count = max(0, min(shard.numel(), p.ds_numel - start))
            if count:
                shard.data[:count].copy_(entry.read(start, count))
        for name, buf in model.named_buffers():
            if name in names:
                entry = entries[names[name]]
                buf.copy_(entry.read(0, buf.numel()).view(buf.shape))
