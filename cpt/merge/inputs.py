"""The models a merge reads, opened as lazy tensor sources: nothing is read until asked for.

Two kinds of input:

- a Hugging Face model directory with safetensors weights (``model.safetensors``, or shards named
  by ``model.safetensors.index.json``). Tensors are read with plain file reads at the offsets the
  headers give (:mod:`cpt.train.partitioned`), not through a memory map, whose pages would stay
  in the process's resident memory after each read;
- a cpt checkpoint (``<run>/<stage>/checkpoints/step-N``) of ZeRO stage 0, 1 or 2: DeepSpeed keeps
  the whole module, in the training precision, in ``mp_rank_00_model_states.pt``; these are
  exactly the tensors `cpt export` would write. The file is memory-mapped and read one tensor at
  a time. The pages a map has read count towards the process's resident memory until it is
  closed, so it is dropped and opened again after every 256 MiB read (an unpickling of some
  milliseconds). A ZeRO-3 checkpoint's weights exist only as partitions: it is exported first.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from cpt.errors import CptError, first_line
from cpt.train.checkpoint import MARKER, read_meta
from cpt.train.partitioned import read_index, safetensors_files

# What is weights in a model directory (and therefore not copied next to the merged weights).
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                   ".h5", ".msgpack", ".gguf")
_REMAP_BYTES = 256 << 20


@dataclass(frozen=True)
class Spec:
    """A tensor's stored dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class Source(ABC):
    """One input model: the directory of its config and tokenizer, and its tensors by name."""

    def __init__(self, name: str, files_dir: Path, specs: dict[str, Spec]):
        self.name = name  # as the user wrote it: error messages name inputs this way
        self.files_dir = files_dir
        self.specs = specs  # in the order they are best read

    @abstractmethod
    def read(self, tensor: str) -> torch.Tensor:
        """The tensor in its stored dtype, in memory of its own."""

    @cached_property
    def config(self) -> dict[str, Any]:
        return _json(self.files_dir / "config.json", self.name)

    @cached_property
    def token_ids(self) -> dict[str, int] | None:
        """The tokenizer's token -> id map (added tokens included), None without a ``tokenizer.json``."""
        path = self.files_dir / "tokenizer.json"
        if not path.is_file():
            return None
        tokenizer = _json(path, self.name)
        vocab = (tokenizer.get("model") or {}).get("vocab") or {}
        ids = {token: i for i, (token, _) in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
        ids.update({added["content"]: added["id"] for added in tokenizer.get("added_tokens") or []})
        return ids

    def files(self) -> list[Path]:
        """The files that describe the model besides its weights (config, tokenizer, generation config...)."""
        return sorted(p for p in self.files_dir.iterdir()
                      if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES))


class HFDirectory(Source):
    def __init__(self, name: str, path: Path):
        try:
            files = safetensors_files(path)
            self._entries = read_index(files)
        except (OSError, ValueError, KeyError, struct.error) as exc:  # a missing shard, a damaged header
            raise CptError(f"cannot read its safetensors weights: {first_line(exc)}", name) from None
        if not files:
            raise CptError("no safetensors weights (model.safetensors or model.safetensors.index.json)", name)
        order = sorted(self._entries, key=lambda k: (str(self._entries[k].path), self._entries[k].offset))
        super().__init__(name, path, {k: Spec(self._entries[k].dtype, self._entries[k].shape) for k in order})

    def read(self, tensor: str) -> torch.Tensor:
        entry = self._entries[tensor]
        return entry.read(0, torch.Size(entry.shape).numel()).view(entry.shape)


class Checkpoint(Source):
    def __init__(self, name: str, path: Path):
        super().__init__(name, path / "hf", {})
        meta = read_meta(path)
        if not {"zero_stage", "tag"} <= meta.keys():
            raise CptError("not a complete cpt checkpoint: its marker names no ZeRO stage or tag", name)
        if meta["zero_stage"] == 3:
            raise CptError(f"a ZeRO-3 checkpoint holds its weights in partitions; run `cpt export {name} DIR` "
                           "and merge DIR", name)
        self._file = path / meta["tag"] / "mp_rank_00_model_states.pt"
        missing = [p for p in (path / "hf" / "config.json", self._file) if not p.is_file()]
        if missing:
            raise CptError(f"not a complete cpt checkpoint: no {missing[0].relative_to(path)}", name)
        self._module: dict[str, torch.Tensor] | None = None
        self._mapped_reads = 0
        self.specs = {k: Spec(v.dtype, tuple(v.shape)) for k, v in _unaliased(self._map()).items()}

    def _map(self) -> dict[str, torch.Tensor]:
        self._module = None  # the previous map goes first, then a fresh one is opened
        try:
            states = torch.load(self._file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError...: all unreadable
            raise CptError(f"cannot read {self._file.name}: {first_line(exc)}", self.name) from None
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise CptError(f"{self._file.name} holds no model weights (no 'module')", self.name)
        self._module, self._mapped_reads = states["module"], 0
        return self._module

    def read(self, tensor: str) -> torch.Tensor:
        module = self._module if self._module is not None and self._mapped_reads < _REMAP_BYTES else self._map()
        copy = module[tensor].clone()
        self._mapped_reads += copy.nbytes
        return copy


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without names for a tensor already listed (tied embeddings), as
    ``save_pretrained`` and `cpt export` store it. Tensors that are distinct views of one buffer
    (DeepSpeed's flat ZeRO buffers) all stay."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept


def open_input(name: str) -> Source:
    """The input ``name`` (a path as given): a cpt checkpoint if it has a checkpoint marker, else
    a Hugging Face model directory."""
    path = Path(name).expanduser()
    if not path.exists():
        raise CptError("no such directory", name)
    if not path.is_dir():
        raise CptError("not a directory", name)
    if (path / MARKER).is_file():
        return Checkpoint(name, path)
    if not (path / "config.json").is_file():
        raise CptError("not a Hugging Face model directory (no config.json) nor a cpt checkpoint", name)
    return HFDirectory(name, path)


def _json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CptError(f"cannot read {path.name}: {first_line(exc)}", where) from None
    if not isinstance(data, dict):
        raise CptError(f"{path.name} is not a JSON object", where)
    return data
