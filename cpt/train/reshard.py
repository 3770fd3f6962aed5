"""Resuming a checkpoint on another number of processes, through DeepSpeed's universal checkpoint.

The data order does not depend on the world size (the sampler draws global batches and each rank
takes its slice of them), so only the split of the training state has to change:

- ZeRO 1-3 partition the fp32 master weights and Adam's moments over the processes. DeepSpeed's
  ``ds_to_universal`` merges the N partitions into one file per weight and state, which an engine
  of any size loads with its ``checkpoint.load_universal`` switch on. Rank 0 converts once, into
  ``<checkpoint>/universal/`` (staged by :mod:`cpt.io`, so a killed conversion is never taken for
  a good one; the checkpoint itself is left as it was), while the others wait.
- ZeRO-0 keeps the whole state in one file that DeepSpeed loads on any number of processes.
- Generator states: rank r of M takes saved rank r mod N's. They do not steer the data order, and
  cpt seeds every rank alike; only dropout masks differ from an uninterrupted run (whose ranks saw
  other slices of the batch anyway).
- Per-rank tensors (the EMA): ZeRO 0-2 ranks hold identical whole copies; ZeRO-3 ranks hold their
  partition of each weight, so the N partitions are joined and cut again into M.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cpt import dist, io
from cpt.errors import CptError, first_line

if TYPE_CHECKING:
    from cpt.train.engine import StepEngine

UNIVERSAL = "universal"


def needs_conversion(meta: Mapping[str, Any], world_size: int) -> bool:
    """Whether a checkpoint (its ``cpt_checkpoint.json``) must be converted to load on ``world_size`` processes."""
    return meta["world_size"] != world_size and meta["zero_stage"] > 0


def convert(ckpt_dir: Path, meta: Mapping[str, Any], rank: int, device: torch.device) -> Path:
    """The universal form of a ZeRO 1-3 checkpoint, made by rank 0 on first use (collective).

    Returns the directory to give ``engine.load_checkpoint`` (with the checkpoint's tag). A failed
    conversion fails on every rank, not only on rank 0 while the others wait for it.
    """
    out = Path(ckpt_dir) / UNIVERSAL
    error = None
    if rank == 0 and not _complete(out):
        try:
            _convert(Path(ckpt_dir), meta["tag"], out)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed fails with asserts, KeyErrors...; raised below on every rank
            error = first_line(exc)
    error = dist.broadcast_object(error, device)
    if error is not None:
        raise CptError(f"converting {ckpt_dir} for another number of processes failed: {error}", where="checkpoint")
    return out


def _complete(out: Path) -> bool:
    return (out / "latest_universal").is_file()  # ds_to_universal's last file


def _convert(ckpt_dir: Path, tag: str, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # Another job forking from the same checkpoint may convert it at the same time: the first wins.
    with io.staged_entry(out, _complete) as tmp:
        args = argparse.Namespace(
            input_folder=str(ckpt_dir / tag), output_folder=str(tmp / tag),
            num_extract_workers=1, num_merge_workers=1,  # in this process: no worker pool under a launcher
            keep_temp_folder=False, strict=True,
            inject_missing_state=True,  # the marker Megatron models carry; a plain module has none
        )
        with open(tmp / "convert.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)


@contextlib.contextmanager
def _loading_universal(engine) -> Iterator[None]:
    """Set DeepSpeed's ``checkpoint.load_universal`` for one load.

    The engine reads the switch only inside ``load_checkpoint``, and it was built before the run
    knew what it resumes, so the switch is turned on for the call instead of in the config.
    """
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def load_engine(trainer: StepEngine, ckpt_dir: Path, meta: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``engine.load_checkpoint`` of a cpt checkpoint written with any number of processes (collective).

    Returns what DeepSpeed's call returns: the loaded path (None on failure) and the client state.
    """
    engine, tag = trainer.engine, meta["tag"]
    if not needs_conversion(meta, trainer.world_size):
        return engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    load_dir = convert(ckpt_dir, meta, trainer.rank, trainer.device)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    with _loading_universal(engine):
        loaded = engine.load_checkpoint(str(load_dir), tag=tag, load_lr_scheduler_states=False)
    _repair_universal_load(engine.optimizer, groups)
    return loaded


def _repair_universal_load(optimizer, groups: list[dict[str, Any]]) -> None:
    """Repair what DeepSpeed's universal load gets wrong under ZeRO-3 (harmless elsewhere).

    It gives every parameter group the first group's hyperparameters (weight decay on the norms):
    the run's own are put back. And it hands all groups one shared Adam step tensor, which each
    group's step would then advance: each gets its own copy.
    """
    for group, own in zip(optimizer.param_groups, groups):
        group.update(own)
    for state in optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def source_rank(meta: Mapping[str, Any], rank: int) -> int:
    """The saved rank whose generator states (and, under ZeRO 0-2, tensors) rank ``rank`` resumes with."""
    return rank % meta["world_size"]


def rank_tensors(
    ckpt_dir: Path, meta: Mapping[str, Any], rank: int, world_size: int, params: Mapping[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor] | None:
    """This rank's part of the per-rank tensors saved with a checkpoint, None when none were saved.

    ``params`` maps each tensor's name to the weight it follows (the EMA's shadow of each weight);
    under ZeRO-3 a saved tensor is its rank's partition of that weight, cut here for ``world_size``.
    """
    from safetensors.torch import load_file

    files = [Path(ckpt_dir) / "tensors" / f"rank-{r}.safetensors" for r in range(meta["world_size"])]
    if not files[0].is_file():
        return None
    if meta["zero_stage"] < 3 or meta["world_size"] == world_size:
        return load_file(str(files[source_rank(meta, rank)]))
    saved = [load_file(str(f)) for f in files]
    return {k: _partition(torch.cat([s[k] for s in saved]), _numel(p), rank, world_size) for k, p in params.items()}


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


def _partition(flat: torch.Tensor, numel: int, rank: int, world_size: int) -> torch.Tensor:
    """ZeRO-3's partition ``rank`` of ``world_size`` of a flat weight: equal parts, the last padded with zeros."""
    size = -(-numel // world_size)
    part = flat[:numel][rank * size : (rank + 1) * size]
    return torch.cat([part, part.new_zeros(size - part.numel())])
