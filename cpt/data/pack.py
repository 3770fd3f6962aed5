"""A prepared split read as fixed-length blocks: tokens, document starts and loss mask, memory-mapped.

Documents are joined into one token stream, each followed by the tokenizer's EOS token, and the
stream is cut into blocks of ``seq_len`` tokens; the trailing partial block is dropped. A domain
with ``metadata`` has a second variant in which each document is preceded by its metadata prefix
(MeCo); the prefix tokens are recorded as not-a-target in a per-token loss mask.

Preparation (:mod:`cpt.data.parallel`) writes the stream once per domain, tokenizer and variant,
whatever the block length; reading it here prepares it first when it is missing. Caches of the
formats before 3 live under other keys and are never read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpt.config.data import DomainConfig
from cpt.data.encode import STARTS
from cpt.data.parallel import domain_entry, prepare, read_index
from cpt.data.sources import Split, fingerprint, metadata_fingerprint
from cpt.data.stream import Blocks, Stream
from cpt.data.tokenizer import tokenizer_fingerprint
from cpt.errors import CptError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["BlockStats", "Packed", "block_stats", "cache_path", "load_blocks", "load_packed"]


@dataclass(frozen=True)
class BlockStats:
    """What a cached split holds, readable without touching its tokens."""

    n_blocks: int
    seq_len: int
    dtype: str
    n_documents: int
    n_tokens: int  # the whole stream, one EOS per document included, before the partial block is dropped
    n_starts: int  # document starts within the kept blocks
    n_masked: int | None  # tokens of the kept blocks that are not targets; None: no loss mask (plain text)
    source: str
    split: str
    domain_fingerprint: str
    metadata_fingerprint: str | None  # the metadata variant's settings; None: plain text
    tokenizer_fingerprint: str


@dataclass(frozen=True)
class Packed:
    """A cached split, memory-mapped: its blocks, where documents start, which tokens are targets."""

    tokens: Blocks | np.ndarray  # (n_blocks, seq_len)
    doc_starts: np.ndarray  # (n_starts,) uint64 offsets into the blocks' flat stream
    loss_mask: Blocks | np.ndarray | None  # (n_blocks, seq_len) uint8, 1 = a target; None: every token is one
    entry: Path  # the split index's directory, and the split
    stats: BlockStats | None = None  # None: blocks made in memory (tests, benchmarks)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def name(self) -> str:
        """What a checkpoint pins: the split of these documents, tokens and variant, under this seed."""
        where = "/".join(self.entry.parts[-4:])  # docs-<key>/splits/<key>/<split>: not where the cache lives
        return f"{self.entry.name}-{hashlib.sha256(where.encode()).hexdigest()[:20]}"

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def cache_path(cfg: DomainConfig, tokenizer: PreTrainedTokenizerFast, cache_dir: Path, metadata: bool = False) -> Path:
    """The directory of the domain's prepared documents (every split, seed and block length reads it)."""
    return domain_entry(cfg, tokenizer, Path(cache_dir), metadata)


def load_packed(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path,
    metadata: bool = False, workers: int | None = None,
) -> Packed:
    """The split as blocks, prepared first if it is not (with ``workers`` processes, default all
    cores). ``metadata``: the variant with each document's metadata prefix (the domain must define
    ``metadata``)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, not {seq_len}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    index = prepare(cfg, tokenizer, Path(cache_dir), seed, metadata=metadata, workers=workers)
    assert index is not None
    meta = read_index(index)
    if meta is None:
        raise CptError(f"the prepared split index {index} is damaged: delete it and prepare again", where="data")
    counts = meta["splits"][split]
    n_blocks = counts["n_tokens"] // seq_len
    if n_blocks == 0:
        raise CptError(
            f"the {split} split of {cfg.source} has {counts['n_tokens']} tokens in {counts['n_documents']} documents: "
            f"not one full block of seq_len={seq_len}",
            where="data",
        )
    entry = index.parent.parent
    files = [entry / "units" / name for name in meta["units"]]
    pieces = np.fromfile(index / f"{split}.pieces", dtype=np.int64)
    tokens = Blocks(Stream([f / "tokens.bin" for f in files], pieces, meta["dtype"]), seq_len, n_blocks)
    starts = np.memmap(index / f"{split}.starts", dtype=STARTS, mode="r") if counts["n_documents"] else \
        np.empty(0, dtype=STARTS)
    n_starts = int(np.searchsorted(starts, n_blocks * seq_len))
    mask = Blocks(Stream([f / "mask.bin" for f in files], pieces, np.uint8), seq_len, n_blocks) if metadata else None
    n_masked = None
    if mask is not None:
        tail = mask.stream.read(n_blocks * seq_len, len(mask.stream))
        n_masked = counts["n_masked"] - int(len(tail) - np.count_nonzero(tail))
    stats = BlockStats(
        n_blocks, seq_len, meta["dtype"], counts["n_documents"], counts["n_tokens"], n_starts, n_masked, cfg.source,
        split, fingerprint(cfg, seed), metadata_fingerprint(cfg) if metadata else None, tokenizer_fingerprint(tokenizer),
    )
    return Packed(tokens, starts[:n_starts], mask, index / split, stats)


def load_blocks(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path
) -> Blocks:
    """The plain split's blocks, ``(n_blocks, seq_len)``, prepared on first use only."""
    return load_packed(cfg, split, tokenizer, seq_len, seed, cache_dir).tokens


def block_stats(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path,
    metadata: bool = False,
) -> BlockStats:
    """Token and document counts of the split, preparing it first if it is not yet."""
    stats = load_packed(cfg, split, tokenizer, seq_len, seed, cache_dir, metadata).stats
    assert stats is not None
    return stats
