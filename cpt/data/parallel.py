"""Prepare a domain on every core, in one pass, identically whatever the number of workers.

The domain's units (:mod:`cpt.data.units`) are tokenized by N worker processes, each writing its
units' directories (:mod:`cpt.data.encode`); units already there (from an interrupted
preparation, or from other machines' shards) are kept. Then the splits are stitched: every
document's key under the recipe's seed gives the held-out cut (:mod:`cpt.data.selection`), and
each split becomes a list of pieces of the units' files plus its documents' starts: an index,
no token copied. With ``max_documents`` only the units holding the first documents are read.

A domain's cache entry ``docs-<key>/`` (the key: its documents, the tokenizer, the variant)::

    units/u000000/ ...          one directory per unit (cpt.data.encode)
    splits/<key>/index.json     per (seed, heldout, max_documents): counts, and which units
    splits/<key>/<split>.pieces int64 (unit, start, end) token ranges, in order
    splits/<key>/<split>.starts uint64 document starts in the split's stream
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from cpt.config.data import DomainConfig
from cpt.data.encode import FORMAT, STARTS, UnitJob, UnitStats, encode_unit, limited_dir, read_unit
from cpt.data.selection import check_size, find_cut, seeded_keys
from cpt.data.sources import documents_fingerprint, metadata_fingerprint
from cpt.data.tokenizer import tokenizer_fingerprint
from cpt.data import units
from cpt.errors import CptError
from cpt.io import staged_entry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
_OFF = ("", "off", "false", "f", "no", "n", "0")  # how the tokenizers library reads a disabled TOKENIZERS_PARALLELISM


@dataclass(frozen=True)
class Shard:
    """``--shard index/count``: this machine prepares units index, index + count, ..."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"expected i/n with whole numbers, e.g. 0/4, not {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"{text}: the shard index must be at least 0 and below the shard count")
        return cls(index, count)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def domain_entry(cfg: DomainConfig, tokenizer: PreTrainedTokenizerFast, cache_dir: Path, metadata: bool) -> Path:
    """The directory of the domain's prepared documents under this tokenizer and variant."""
    variant = metadata_fingerprint(cfg) if metadata else None
    key = json.dumps([documents_fingerprint(cfg), tokenizer_fingerprint(tokenizer), variant, units.UNIT_BYTES, FORMAT])
    return Path(cache_dir) / f"docs-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def split_dir(entry: Path, cfg: DomainConfig, seed: int) -> Path:
    key = json.dumps([seed, cfg.heldout, cfg.max_documents])
    return entry / "splits" / hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare(
    cfg: DomainConfig, tokenizer: PreTrainedTokenizerFast, cache_dir: Path, seed: int, *, metadata: bool = False,
    workers: int | None = None, shard: Shard | None = None,
) -> Path | None:
    """Tokenize what is missing of the domain and stitch its splits; the split index's directory.

    With ``shard``, only that share of the units is tokenized and nothing is stitched (None).
    """
    if metadata and cfg.metadata is None:
        raise ValueError(f"{cfg.source} defines no metadata")
    if tokenizer.eos_token_id is None:
        raise CptError("the tokenizer has no end-of-sequence token to separate documents", where="tokenizer")
    entry = domain_entry(cfg, tokenizer, cache_dir, metadata)
    index = split_dir(entry, cfg, seed)
    if shard is None and read_index(index) is not None:
        return index
    elif shard is None and index.exists():
        log.warning("ignoring the damaged split index %s: stitching it again", index)
    planned = units.plan_units(cfg)
    dtype = token_dtype(tokenizer)
    definition = tokenizer.backend_tokenizer.to_str()  # one string, shared by every job
    job = lambda unit: UnitJob(cfg, unit, definition, tokenizer.eos_token_id, dtype.name, metadata,  # noqa: E731
                               unit_dir(entry, unit.index))
    if shard is not None:  # a capped domain is read only up to its cap, in order: by the first shard
        mine = [job(u) for u in planned if u.index % shard.count == shard.index] if cfg.max_documents is None else \
            [job(u) for u in planned] if shard.index == 0 else []
        _run(mine, workers, cfg.source, cap=cfg.max_documents)
        return None
    needed = _run([job(u) for u in planned], workers, cfg.source, cap=cfg.max_documents)
    _stitch(index, cfg, seed, needed, dtype, metadata)
    return index


def unit_dir(entry: Path, index: int) -> Path:
    return entry / "units" / f"u{index:06d}"


def token_dtype(tokenizer: PreTrainedTokenizerFast) -> np.dtype:
    vocab = max(len(tokenizer), tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def _run(jobs: list[UnitJob], workers: int | None, source: str, cap: int | None) -> list[tuple[Path, UnitStats]]:
    """Tokenize units in order until their documents reach ``cap``; the directories and counts of
    the units needed, a prefix of ``jobs``. Units already on disk are only read.

    Under a cap, a unit whose predecessors are all known is read only up to the cap, into a
    directory of its own (``u000003-first120``): a small cap never reads a whole large unit."""
    done: dict[int, tuple[Path, UnitStats]] = {}
    for position, job in enumerate(jobs):
        if not _needed(done, position, cap):
            break
        capped = _capped(job, done, position, cap)
        for candidate in dict.fromkeys((job.out, job.out if capped.limit is None else limited_dir(job.out, capped.limit))):
            found = read_unit(candidate)  # the whole unit, or its first documents
            if found is not None:
                done[position] = (candidate, found)
                break
    todo = [p for p in range(len(jobs)) if p not in done]
    n = min(workers or usable_cores(), len(todo))
    if n == 1 and os.environ.get("TOKENIZERS_PARALLELISM", "unset").lower() in _OFF:
        log.warning("TOKENIZERS_PARALLELISM=%s: tokenizing on one thread; unset it to use every core",
                    os.environ["TOKENIZERS_PARALLELISM"])
    bar = tqdm(total=None if cap else sum(jobs[p].unit.size for p in todo) or None, unit="B", unit_scale=True, desc=source,
               disable=None if todo else True, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        if n <= 1:
            for position in todo:
                if _needed(done, position, cap):
                    done[position] = _report(bar, encode_unit(_capped(jobs[position], done, position, cap)))
        else:
            _pool(jobs, todo, done, n, cap, bar)
    finally:
        bar.close()
    needed = _prefix(done, len(jobs), cap)
    made = [done[p][1] for p in todo if p in done]
    if made:
        seconds = time.perf_counter() - started
        log.info("%s: %d unit(s), %s documents, %s tokens in %.1f s (%.1f MB/s) on %d worker(s)", source, len(made),
                 f"{sum(s.n_documents for s in made):,}", f"{sum(s.n_tokens for s in made):,}", seconds,
                 sum(s.size for s in made) / max(seconds, 1e-9) / 1e6, max(n, 1))
    return [done[p] for p in range(needed)]


def _capped(job: UnitJob, done: dict[int, tuple[Path, UnitStats]], position: int, cap: int | None) -> UnitJob:
    """The job reading only the documents still under ``cap``, when all units before it are known."""
    if cap is None or any(p not in done for p in range(position)):
        return job
    return replace(job, limit=cap - sum(done[p][1].n_documents for p in range(position)))


def _pool(jobs: list[UnitJob], todo: list[int], done: dict[int, tuple[Path, UnitStats]], n: int, cap: int | None,
          bar: tqdm) -> None:
    """``n`` worker processes, one encoder thread each; units are handed out in order, never more
    than ``n`` at once, so that a cap stops the reading early.

    Workers are forked on Linux, as PyTorch's DataLoader workers are: a spawned worker would
    re-run the caller's main module, which a script without a ``__main__`` guard (or standard
    input) cannot survive. They touch no thread of the parent (torch's, the encoder's)."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    queue = list(todo)
    running: dict[Future, int] = {}
    with ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker) as pool:
        try:
            while queue or running:
                while queue and len(running) < n and _needed(done, queue[0], cap) and _near(done, queue[0], cap, n):
                    position = queue.pop(0)
                    running[pool.submit(encode_unit, _capped(jobs[position], done, position, cap))] = position
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()
                    done[running.pop(future)] = _report(bar, result)
        except BrokenProcessPool:
            unit = min(running.values()) if running else "?"
            raise CptError(
                f"a preparation worker died (killed, or out of memory?) while unit {unit} or a later one was being "
                "tokenized; the finished units are kept and nothing was stitched: run it again to continue",
                where=jobs[0].cfg.source,
            ) from None
        except BaseException:
            for future in running:
                future.cancel()
            raise


def _init_worker() -> None:
    """One encoder thread per worker: the workers are the parallelism (and a forked child cannot
    use the parent's encoder threads anyway)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _report(bar: tqdm, result: tuple[Path, UnitStats]) -> tuple[Path, UnitStats]:
    """Advance the bar by a finished unit's bytes; show the documents and tokens so far."""
    stats = result[1]
    bar.documents = getattr(bar, "documents", 0) + stats.n_documents
    bar.tokens = getattr(bar, "tokens", 0) + stats.n_tokens
    bar.set_postfix_str(f"{bar.documents:,} documents, {bar.tokens:,} tokens", refresh=False)
    bar.update(stats.size)
    return result


def _needed(done: dict[int, tuple[Path, UnitStats]], position: int, cap: int | None) -> bool:
    """Whether unit ``position`` may hold one of the first ``cap`` documents, as far as is known."""
    documents = 0
    for earlier in range(position):
        if cap is None or earlier not in done:
            return True
        documents += done[earlier][1].n_documents
        if documents >= cap:
            return False
    return True


def _near(done: dict[int, tuple[Path, UnitStats]], position: int, cap: int | None, n: int) -> bool:
    """Under a cap, whether unit ``position`` is within ``n`` of the first unit not yet known:
    at most ``n - 1`` units are read past the one where the cap falls."""
    return cap is None or position < next(p for p in range(position + 1) if p not in done) + n


def _prefix(done: dict[int, tuple[Path, UnitStats]], limit: int, cap: int | None) -> int:
    """How many leading units are needed: all ``limit``, or up to the one holding document ``cap``."""
    documents = 0
    for position in range(limit):
        if cap is not None and documents >= cap:
            return position
        documents += done[position][1].n_documents
    return limit


# ----------------------------------------------------------------------------- stitching


def read_index(index: Path) -> dict | None:
    """The split index if complete and of this format (its files the sizes it says, its units
    sound); None otherwise."""
    try:
        meta = json.loads((index / "index.json").read_text())
        if meta.get("format") != FORMAT:
            return None
        if any(read_unit(index.parent.parent / "units" / name) is None for name in meta["units"]):
            return None
        for split in SPLITS:
            counts = meta["splits"][split]
            if (index / f"{split}.pieces").stat().st_size != counts["n_pieces"] * 24:
                return None
            if (index / f"{split}.starts").stat().st_size != counts["n_documents"] * 8:
                return None
        return meta
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _stitch(index: Path, cfg: DomainConfig, seed: int, needed: list[tuple[Path, UnitStats]], dtype: np.dtype,
            metadata: bool) -> None:
    """Write the splits' pieces and starts: the cut from every needed document's key, then runs of
    held-out and training documents of each unit."""
    limits = _limits([stats for _, stats in needed], cfg.max_documents)
    keys = lambda u: seeded_keys(np.fromfile(needed[u][0] / "hashes.bin", dtype="<u8")[: limits[u]], seed)  # noqa: E731
    cut = find_cut((keys(u) for u in range(len(limits))), cfg.heldout)
    check_size(cfg, cut)
    with staged_entry(index, lambda d: read_index(d) is not None) as staging:
        counts = {}
        with open(staging / "train.pieces", "wb") as tp, open(staging / "train.starts", "wb") as ts, \
                open(staging / "heldout.pieces", "wb") as hp, open(staging / "heldout.starts", "wb") as hs:
            outputs = {False: _SplitWriter(tp, ts), True: _SplitWriter(hp, hs)}
            first = 0
            for unit, limit in enumerate(limits):
                held = cut.held(keys(unit), first)
                first += limit
                _add_runs(needed[unit][0], unit, limit, needed[unit][1], held, outputs, metadata)
            for split, writer in zip(SPLITS, (outputs[False], outputs[True])):
                counts[split] = writer.counts()
        (staging / "index.json").write_text(json.dumps({
            "format": FORMAT, "units": [path.name for path, _ in needed], "dtype": dtype.name, "metadata": metadata,
            "source": cfg.source, "seed": seed, "heldout": cfg.heldout, "max_documents": cfg.max_documents,
            "splits": counts,
        }, indent=1))


def _limits(stats: list[UnitStats], cap: int | None) -> list[int]:
    """Documents used of each needed unit: all, up to the cap."""
    limits, left = [], cap
    for unit in stats:
        take = unit.n_documents if left is None else min(unit.n_documents, left)
        limits.append(take)
        left = None if left is None else left - take
    return limits


class _SplitWriter:
    """One split's pieces and document starts as they are found, in order."""

    def __init__(self, pieces, starts):
        self.pieces, self.starts = pieces, starts
        self.n_pieces = self.n_documents = self.n_tokens = self.n_masked = 0

    def add(self, unit: int, start: int, end: int, doc_starts: np.ndarray, masked: int) -> None:
        self.pieces.write(np.array([unit, start, end], dtype=np.int64).data)
        self.starts.write((doc_starts.astype(np.int64) - start + self.n_tokens).astype(STARTS).data)
        self.n_pieces += 1
        self.n_documents += len(doc_starts)
        self.n_tokens += end - start
        self.n_masked += masked

    def counts(self) -> dict[str, int]:
        return {"n_pieces": self.n_pieces, "n_documents": self.n_documents, "n_tokens": self.n_tokens,
                "n_masked": self.n_masked}


def _add_runs(directory: Path, unit: int, limit: int, stats: UnitStats, held: np.ndarray,
              outputs: dict[bool, _SplitWriter], metadata: bool) -> None:
    """Each run of consecutive documents of one split becomes one piece of that split."""
    if limit == 0:
        return
    starts = np.fromfile(directory / "starts.bin", dtype="<u8")[: limit + 1].astype(np.int64)
    ends = np.append(starts[1:limit], starts[limit] if limit < len(starts) else stats.n_tokens)
    starts = starts[:limit]
    mask = np.memmap(directory / "mask.bin", dtype=np.uint8, mode="r") if metadata and stats.n_tokens else None
    change = np.flatnonzero(np.diff(held)) + 1
    for a, b in zip([0, *change], [*change, limit]):
        start, end = int(starts[a]), int(ends[b - 1])
        masked = int((end - start) - np.count_nonzero(mask[start:end])) if mask is not None else 0
        outputs[bool(held[a])].add(unit, start, end, starts[a:b], masked)
