"""Atomic, self-describing training checkpoints in DeepSpeed's own format.

Layout of ``<root>/step-<N>/`` (N the plain optimizer-step number of the run):

- ``latest``, ``global_step<N>/`` and, under ZeRO, ``zero_to_fp32.py``: what
  ``engine.save_checkpoint`` writes, so DeepSpeed's tools work on it (``python zero_to_fp32.py . out/``).
- ``rng/rank-<r>.json``: each rank's Python, NumPy and torch generator states.
- ``tensors/rank-<r>.safetensors``: each rank's own extra tensors (e.g. its part of an EMA), if any.
- ``hf/``: the model's Hugging Face config and the tokenizer, so the checkpoint exports alone.
- ``cpt_checkpoint.json``: written last; a directory without it is not a checkpoint.

Every rank writes into ``<root>/.tmp-step-<N>`` and flushes what it wrote to disk; after a
barrier rank 0 writes the marker and renames the directory into place. A crash at any moment
leaves either the complete new checkpoint or none, and never touches the previous ones;
leftovers are removed by the next save. ``CPT_FAULT`` (:mod:`cpt.faults`) kills a process at each
phase of a save in the crash tests.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cpt import dist, faults
from cpt.errors import CptError
from cpt.io import fsync_tree, io_errors, library_io_errors, replace_dir, write_json
from cpt.train import reshard

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cpt.train.engine import StepEngine

MARKER = "cpt_checkpoint.json"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_CLIENT_KEY = "cpt_client_state"  # DeepSpeed merges client state into its own dict: keep ours apart


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def _tag(step: int) -> str:
    return f"global_step{step}"


def save(
    trainer: StepEngine, root: Path, step: int, client_state: dict[str, Any], *, tokenizer: PreTrainedTokenizerBase,
    keep: int | None = None, rank_tensors: dict[str, torch.Tensor] | None = None, data: dict[str, Any] | None = None,
) -> Path:
    """Save a checkpoint of ``trainer`` after ``step`` (every rank calls this); keep the last ``keep``.

    ``client_state`` is the caller's resumable state (data position, step, ...); it must be
    picklable and is returned by :func:`load`. ``rank_tensors`` are this rank's own tensors,
    read back by :func:`load_rank_tensors`. ``data`` describes the data the state indexes; it is
    kept in the marker, readable (:func:`read_meta`) before anything is loaded. Refuses (CptError) when a weight is non-finite; a
    failed write (a full disk) is a CptError naming the path, and the earlier checkpoints stay.
    """
    if keep is not None and keep < 1:
        raise ValueError("keep must be at least 1")
    if not trainer.weights_finite():
        raise CptError(f"not saving step {step}: the model has non-finite weights", where="checkpoint")
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-step-{step}"
    if trainer.rank == 0:
        with io_errors(root):
            root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        _write_rank_files(trainer, tmp, step, client_state, rank_tensors)
        dist.barrier()  # every rank's files are on disk before the marker says so
        if trainer.rank == 0:
            _complete(trainer, tmp, step, tokenizer, data)
            with io_errors(final):
                faults.point("checkpoint.rename", tmp)
                replace_dir(tmp, final)
            faults.point("checkpoint.renamed", final)
            prune(root, keep)
    except CptError:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last good checkpoint is untouched
        raise
    dist.barrier()
    return final


def _write_rank_files(
    trainer: StepEngine, tmp: Path, step: int, client_state: dict[str, Any], rank_tensors: dict[str, torch.Tensor] | None
) -> None:
    """This rank's part of a save, flushed to disk: DeepSpeed's files, its generators, its own tensors."""
    with library_io_errors(tmp):
        trainer.engine.save_checkpoint(str(tmp), tag=_tag(step), client_state={_CLIENT_KEY: client_state})
    with io_errors(tmp):
        faults.point("checkpoint.engine", tmp)
        (tmp / "rng").mkdir(exist_ok=True)
        write_json(tmp / "rng" / f"rank-{trainer.rank}.json", _rng_state())
        faults.point("checkpoint.rng", tmp)
        if rank_tensors is not None:
            from safetensors.torch import save_file

            (tmp / "tensors").mkdir(exist_ok=True)
            path = tmp / "tensors" / f"rank-{trainer.rank}.safetensors"
            with library_io_errors(path):
                save_file({k: v.contiguous() for k, v in rank_tensors.items()}, str(path))
        # What this host wrote must be durable before the marker on another host declares it so.
        fsync_tree(tmp)


def _complete(trainer: StepEngine, tmp: Path, step: int, tokenizer: PreTrainedTokenizerBase, data: dict | None) -> None:
    """Rank 0's last part: the config and tokenizer for export, then the marker that makes it a checkpoint."""
    with library_io_errors(tmp / "hf"):
        trainer.module.config.save_pretrained(tmp / "hf")
        if trainer.module.generation_config is not None:
            trainer.module.generation_config.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
    meta = {
        "format": FORMAT,
        "step": step,
        "tag": _tag(step),
        "world_size": trainer.world_size,
        "zero_stage": trainer.zero_stage,
        "precision": trainer.precision,
        "trainer": trainer.state_dict(),
        "data": data,
    }
    with io_errors(tmp):
        fsync_tree(tmp / "hf")
        faults.point("checkpoint.marker", tmp)
        write_json(tmp / MARKER, meta)


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint (which may have been moved or renamed); CptError otherwise."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CptError(f"{ckpt_dir} is not a complete cpt checkpoint (no readable {MARKER})", where="checkpoint") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CptError(f"{ckpt_dir} is not a cpt checkpoint of format {FORMAT}", where="checkpoint")
    return meta


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints ``root/step-<N>`` of a run, oldest step first."""
    found = []
    for d in Path(root).glob("step-*"):
        match = _STEP_DIR.fullmatch(d.name)
        try:
            if match and read_meta(d)["step"] == int(match.group(1)):
                found.append((int(match.group(1)), d))
        except CptError:
            continue
    return [d for _, d in sorted(found)]


def latest(root: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None; partial saves are never chosen."""
    found = checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int | None) -> None:
    """Delete all but the last ``keep`` complete checkpoints (all are kept when None) and any leftovers."""
    root = Path(root)
    complete = checkpoints(root)
    doomed = complete[: -keep] if keep is not None else []
    doomed += list(root.glob(".tmp-step-*")) + list(root.glob(".old-step-*"))
    doomed += [d for d in root.glob("step-*") if d.is_dir() and d not in complete]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)


def load(trainer: StepEngine, ckpt_dir: Path) -> dict[str, Any]:
    """Restore model, optimizer, counters and this rank's generators; return the saved client state.

    The run must have the checkpoint's ZeRO stage and precision: that is what makes the
    continuation exact (to change them, export the checkpoint and start from the export). Another
    number of processes is fine: the checkpoint is converted once (:mod:`cpt.train.reshard`).
    DeepSpeed unpickles its checkpoint files: load only checkpoints you trust.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    here = {"zero_stage": trainer.zero_stage, "precision": trainer.precision}
    differ = [f"{k} {meta[k]} (this run: {v})" for k, v in here.items() if meta[k] != v]
    if differ:
        raise CptError(
            f"{ckpt_dir} was written with " + ", ".join(differ) + "; resume with the same settings, "
            "or `cpt export` it and start a new stage from the export",
            where="checkpoint",
        )
    path, client = reshard.load_engine(trainer, ckpt_dir, meta)
    if path is None:
        raise CptError(f"DeepSpeed could not load {ckpt_dir / meta['tag']}", where="checkpoint")
    trainer.load_state_dict(meta["trainer"])
    _set_rng_state(json.loads((ckpt_dir / "rng" / f"rank-{reshard.source_rank(meta, trainer.rank)}.json").read_text()))
    return client[_CLIENT_KEY]


def load_rank_tensors(
    ckpt_dir: Path, rank: int, world_size: int, params: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor] | None:
    """Rank ``rank``'s part of the per-rank tensors saved with the checkpoint (None when none were),
    re-cut for ``world_size`` processes; ``params`` maps each tensor's name to the weight it follows."""
    return reshard.rank_tensors(ckpt_dir, read_meta(ckpt_dir), rank, world_size, params)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
