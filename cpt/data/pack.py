"""Tokenize a domain split once and pack it into fixed-length blocks, cached as memory-mapped arrays.

Documents are joined into one token stream, each followed by the tokenizer's EOS token, and the
stream is cut into blocks of ``seq_len`` tokens; the trailing partial block is dropped. A domain
with ``metadata`` has a second variant in which each document is preceded by its metadata prefix
(MeCo); the prefix tokens are recorded as not-a-target in a per-token loss mask.

A cache entry (format 2) is a directory that appears by one atomic rename, so a killed or
concurrent writer never leaves an entry that a reader would use:

- ``blocks.bin``: the tokens, ``(n_blocks, seq_len)``;
- ``doc_starts.bin``: uint64 offsets into the blocks' flat stream where a document begins
  (its prefix, if any), ascending: document boundaries for document masking;
- ``loss_mask.bin`` (metadata variant only): uint8 per token, 1 where the token is a target;
- ``meta.json``: counts and what the entry was built from.

Entries of format 1 (tokens only) live under other keys and are never read: they are rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from cpt.config.data import DomainConfig
from cpt.data.sources import fingerprint, iter_documents, iter_tagged, metadata_fingerprint
from cpt.data.splits import Split
from cpt.data.tokenizer import tokenizer_fingerprint
from cpt.errors import CptError
from cpt.io import staged_entry

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
STARTS_DTYPE = np.dtype("<u8")
# A batch of text handed to the Rust encoder at once: large enough to keep every core busy,
# small enough that its encodings (~100 bytes per token) stay a bounded amount of memory.
_BATCH_CHARS = 1 << 20
_BATCH_DOCUMENTS = 1024
_OFF = ("", "off", "false", "f", "no", "n", "0")  # how the tokenizers library reads a disabled TOKENIZERS_PARALLELISM


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

    tokens: np.memmap  # (n_blocks, seq_len)
    doc_starts: np.ndarray  # (n_starts,) uint64 offsets into tokens.reshape(-1)
    loss_mask: np.memmap | None  # (n_blocks, seq_len) uint8, 1 = a target; None: every token is one
    entry: Path
    stats: BlockStats | None = None  # None: blocks made in memory (tests, benchmarks)

    def __len__(self) -> int:
        return len(self.tokens)

    def former_names(self) -> tuple[str, ...]:
        """Names the same tokens had under earlier formats: format 1 held the plain variant's tokens
        exactly as format 2 does, so a checkpoint that pinned that entry indexes these blocks."""
        stats = self.stats
        if stats is None or stats.metadata_fingerprint is not None:
            return ()
        key = json.dumps([stats.domain_fingerprint, stats.tokenizer_fingerprint, stats.seq_len, stats.split, 1])
        return (f"{stats.split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}",)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def cache_path(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path,
    metadata: bool = False,
) -> Path:
    """The cache entry (a directory) of a packed split: same documents, tokenizer, seq_len and variant, same entry."""
    return _entry_path(Path(cache_dir), split, fingerprint(cfg, seed), tokenizer_fingerprint(tokenizer), seq_len,
                       _variant(cfg, metadata))


def load_packed(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path,
    metadata: bool = False,
) -> Packed:
    """The split read-only from its cache entry, tokenized on first use only. ``metadata``: the
    variant with each document's metadata prefix (the domain must define ``metadata``)."""
    entry, stats = _ensure(cfg, split, tokenizer, seq_len, seed, Path(cache_dir), _variant(cfg, metadata))
    shape = (stats.n_blocks, stats.seq_len)
    return Packed(
        tokens=np.memmap(entry / "blocks.bin", dtype=stats.dtype, mode="r", shape=shape),
        doc_starts=np.memmap(entry / "doc_starts.bin", dtype=STARTS_DTYPE, mode="r", shape=(stats.n_starts,))
        if stats.n_starts else np.empty(0, dtype=STARTS_DTYPE),
        loss_mask=np.memmap(entry / "loss_mask.bin", dtype=np.uint8, mode="r", shape=shape)
        if stats.n_masked is not None else None,
        entry=entry,
        stats=stats,
    )


def load_blocks(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path
) -> np.memmap:
    """The plain split's blocks as a read-only ``(n_blocks, seq_len)`` memmap, tokenized on first use only."""
    return load_packed(cfg, split, tokenizer, seq_len, seed, cache_dir).tokens


def block_stats(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path,
    metadata: bool = False,
) -> BlockStats:
    """Token and document counts of the split, tokenizing it first if it is not cached yet."""
    return _ensure(cfg, split, tokenizer, seq_len, seed, Path(cache_dir), _variant(cfg, metadata))[1]


def token_dtype(tokenizer: PreTrainedTokenizerFast) -> np.dtype:
    vocab = max(len(tokenizer), tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def _variant(cfg: DomainConfig, metadata: bool) -> str | None:
    """The metadata variant's key part; None for plain text."""
    if not metadata:
        return None
    if cfg.metadata is None:
        raise ValueError(f"{cfg.source} defines no metadata")
    return metadata_fingerprint(cfg)


def _entry_path(cache_dir: Path, split: str, domain_fp: str, tokenizer_fp: str, seq_len: int, variant: str | None) -> Path:
    key = json.dumps([domain_fp, tokenizer_fp, seq_len, split, variant, FORMAT_VERSION])
    return cache_dir / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def _ensure(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path,
    variant: str | None,
) -> tuple[Path, BlockStats]:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, not {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CptError("the tokenizer has no end-of-sequence token to separate documents", where="tokenizer")
    domain_fp, tokenizer_fp = fingerprint(cfg, seed), tokenizer_fingerprint(tokenizer)
    entry = _entry_path(cache_dir, split, domain_fp, tokenizer_fp, seq_len, variant)
    stats = _read_entry(entry)
    if stats is not None:
        log.info("%s %s: cached blocks at %s", cfg.source, split, entry)
        return entry, stats
    log.info("%s %s: tokenizing and packing into %s", cfg.source, split, entry)
    if os.environ.get("TOKENIZERS_PARALLELISM", "unset").lower() in _OFF:
        setting = os.environ["TOKENIZERS_PARALLELISM"]
        log.warning("TOKENIZERS_PARALLELISM=%s: tokenizing on one core; unset it to use them all", setting)
    dtype = token_dtype(tokenizer)
    masked = variant is not None
    with staged_entry(entry, lambda e: _read_entry(e) is not None) as staging:  # flushed to disk before it appears
        with open(staging / "blocks.bin", "wb") as tokens, open(staging / "doc_starts.bin", "wb") as starts, \
                open(staging / "loss_mask.bin" if masked else os.devnull, "wb") as mask:
            records = iter_tagged(cfg, split, seed) if masked else (("", t) for t in iter_documents(cfg, split, seed))
            out = _Outputs(tokens, starts, mask if masked else None)
            n_documents, n_tokens = _pack(records, tokenizer.backend_tokenizer, eos, dtype, seq_len, out)
        if out.n_blocks == 0:
            raise CptError(
                f"the {split} split of {cfg.source} has {n_tokens} tokens in {n_documents} documents: "
                f"not one full block of seq_len={seq_len}",
                where="data",
            )
        stats = BlockStats(
            out.n_blocks, seq_len, dtype.name, n_documents, n_tokens, out.n_starts,
            out.n_masked if masked else None, cfg.source, split, domain_fp, variant, tokenizer_fp,
        )
        (staging / "meta.json").write_text(json.dumps(asdict(stats) | {"format": FORMAT_VERSION}, indent=1))
    return entry, stats


@dataclass
class _Outputs:
    """The entry's files being written, and what has gone into them (whole blocks only)."""

    tokens: BinaryIO
    starts: BinaryIO
    mask: BinaryIO | None
    n_blocks: int = 0
    n_starts: int = 0
    n_masked: int = 0


def _pack(
    records: Iterable[tuple[str, str]], backend: Tokenizer, eos: int, dtype: np.dtype, seq_len: int, out: _Outputs
) -> tuple[int, int]:
    """Write whole blocks as they fill; only the unfinished block is carried between batches.

    Prefix and text are encoded apart, so a document's text has the same tokens in both variants
    and its prefix tokens are known exactly. ``encode_batch_fast`` is ``encode_batch`` without
    character offsets, which packing never needs. Returns (documents, tokens).
    """
    carry = np.empty(0, dtype=dtype)
    carry_mask = np.empty(0, dtype=np.uint8)
    pending = np.empty(0, dtype=STARTS_DTYPE)  # starts of documents not yet inside a whole block
    n_documents = n_tokens = 0
    for batch in _batches(records):
        texts = backend.encode_batch_fast([text for _, text in batch], add_special_tokens=False)
        ids = [encoding.ids for encoding in texts]
        for doc_ids in ids:
            doc_ids.append(eos)
        targets = np.array([len(doc_ids) for doc_ids in ids], dtype=np.int64)
        prefixed = [(i, prefix) for i, (prefix, _) in enumerate(batch) if prefix]
        heads = np.zeros(len(batch), dtype=np.int64)
        if prefixed:
            encoded = backend.encode_batch_fast([prefix for _, prefix in prefixed], add_special_tokens=False)
            for (i, _), encoding in zip(prefixed, encoded):
                ids[i] = encoding.ids + ids[i]
                heads[i] = len(encoding.ids)
        lengths = heads + targets
        fresh = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        starts = n_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(STARTS_DTYPE)
        stream = np.concatenate([carry, fresh])
        full = len(stream) // seq_len
        written = (out.n_blocks + full) * seq_len  # stream offset where the carried tokens begin
        out.tokens.write(stream[: full * seq_len].data)
        pending = np.concatenate([pending, starts])
        inside = int(np.searchsorted(pending, written))
        out.starts.write(pending[:inside].data)
        out.n_starts += inside
        pending = pending[inside:]
        if out.mask is not None:
            mask = np.concatenate([carry_mask, np.repeat(np.tile(np.array([0, 1], np.uint8), len(batch)),
                                                         np.stack([heads, targets], axis=1).reshape(-1))])
            out.mask.write(mask[: full * seq_len].data)
            out.n_masked += int(full * seq_len - mask[: full * seq_len].sum(dtype=np.int64))
            carry_mask = mask[full * seq_len :].copy()
        carry = stream[full * seq_len :].copy()
        n_documents += len(batch)
        n_tokens += len(fresh)
        out.n_blocks += full
    return n_documents, n_tokens


def _batches(records: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for record in records:
        batch.append(record)
        chars += len(record[0]) + len(record[1])
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_entry(entry: Path) -> BlockStats | None:
    """The entry's stats if it is complete, consistent and of this format; anything else is absent."""
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if isinstance(meta, dict) and meta.get("format") != FORMAT_VERSION:
            log.warning("ignoring the cache entry %s of format %s (this cpt reads format %s)", entry,
                        meta.get("format", 1), FORMAT_VERSION)
            return None
        stats = BlockStats(**{k: v for k, v in meta.items() if k != "format"})
        tokens = stats.n_blocks * stats.seq_len
        sizes = {"blocks.bin": tokens * np.dtype(stats.dtype).itemsize, "doc_starts.bin": stats.n_starts * 8}
        if stats.n_masked is not None:
            sizes["loss_mask.bin"] = tokens
        sound = stats.n_blocks >= 1 and all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        sound = False
    if not sound:
        log.warning("ignoring the damaged cache entry %s", entry)
        return None
    return stats
