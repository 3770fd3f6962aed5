"""Tokenize a domain split once and pack it into fixed-length blocks, cached as a memory-mapped array.

Documents are joined into one token stream, each followed by the tokenizer's EOS token, and the
stream is cut into blocks of ``seq_len`` tokens; the trailing partial block is dropped. A cache
entry is a directory (``blocks.bin`` + ``meta.json``) that appears by one atomic rename, so a
killed or concurrent writer never leaves an entry that a reader would use.
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
from cpt.data.sources import fingerprint, iter_documents
from cpt.data.splits import Split
from cpt.data.tokenizer import tokenizer_fingerprint
from cpt.errors import CptError
from cpt.io import staged_entry

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
    source: str
    split: str
    domain_fingerprint: str
    tokenizer_fingerprint: str


def cache_path(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path
) -> Path:
    """The cache entry (a directory) of a packed split: same documents, tokenizer and seq_len, same entry."""
    return _entry_path(Path(cache_dir), split, fingerprint(cfg, seed), tokenizer_fingerprint(tokenizer), seq_len)


def load_blocks(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path
) -> np.memmap:
    """The split's blocks as a read-only ``(n_blocks, seq_len)`` memmap, tokenized on first use only."""
    entry, stats = _ensure(cfg, split, tokenizer, seq_len, seed, Path(cache_dir))
    return np.memmap(entry / "blocks.bin", dtype=stats.dtype, mode="r", shape=(stats.n_blocks, stats.seq_len))


def block_stats(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path
) -> BlockStats:
    """Token and document counts of the split, tokenizing it first if it is not cached yet."""
    return _ensure(cfg, split, tokenizer, seq_len, seed, Path(cache_dir))[1]


def token_dtype(tokenizer: PreTrainedTokenizerFast) -> np.dtype:
    vocab = max(len(tokenizer), tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    return np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def _entry_path(cache_dir: Path, split: str, domain_fp: str, tokenizer_fp: str, seq_len: int) -> Path:
    key = json.dumps([domain_fp, tokenizer_fp, seq_len, split, FORMAT_VERSION])
    return cache_dir / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def _ensure(
    cfg: DomainConfig, split: Split, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int, cache_dir: Path
) -> tuple[Path, BlockStats]:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, not {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CptError("the tokenizer has no end-of-sequence token to separate documents", where="tokenizer")
    domain_fp, tokenizer_fp = fingerprint(cfg, seed), tokenizer_fingerprint(tokenizer)
    entry = _entry_path(cache_dir, split, domain_fp, tokenizer_fp, seq_len)
    stats = _read_entry(entry)
    if stats is not None:
        log.info("%s %s: cached blocks at %s", cfg.source, split, entry)
        return entry, stats
    log.info("%s %s: tokenizing and packing into %s", cfg.source, split, entry)
    if os.environ.get("TOKENIZERS_PARALLELISM", "unset").lower() in _OFF:
        setting = os.environ["TOKENIZERS_PARALLELISM"]
        log.warning("TOKENIZERS_PARALLELISM=%s: tokenizing on one core; unset it to use them all", setting)
    dtype = token_dtype(tokenizer)
    with staged_entry(entry, lambda e: _read_entry(e) is not None) as staging:  # flushed to disk before it appears
        with open(staging / "blocks.bin", "wb") as out:
            documents = iter_documents(cfg, split, seed)
            n_documents, n_tokens, n_blocks = _pack(documents, tokenizer.backend_tokenizer, eos, dtype, seq_len, out)
        if n_blocks == 0:
            raise CptError(
                f"the {split} split of {cfg.source} has {n_tokens} tokens in {n_documents} documents: "
                f"not one full block of seq_len={seq_len}",
                where="data",
            )
        stats = BlockStats(
            n_blocks, seq_len, dtype.name, n_documents, n_tokens, cfg.source, split, domain_fp, tokenizer_fp
        )
        (staging / "meta.json").write_text(json.dumps(asdict(stats) | {"format": FORMAT_VERSION}, indent=1))
    return entry, stats


def _pack(
    documents: Iterable[str], backend: Tokenizer, eos: int, dtype: np.dtype, seq_len: int, out: BinaryIO
) -> tuple[int, int, int]:
    """Write whole blocks as they fill; only the unfinished block is carried between batches.

    ``encode_batch_fast`` is ``encode_batch`` without character offsets, which packing never needs.
    Returns (documents, tokens, blocks).
    """
    carry = np.empty(0, dtype=dtype)
    n_documents = n_tokens = n_blocks = 0
    for texts in _batches(documents):
        ids = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        for doc_ids in ids:
            doc_ids.append(eos)
        fresh = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids)))
        stream = np.concatenate([carry, fresh])
        full = len(stream) // seq_len
        out.write(stream[: full * seq_len].data)
        carry = stream[full * seq_len :].copy()
        n_documents += len(texts)
        n_tokens += len(fresh)
        n_blocks += full
    return n_documents, n_tokens, n_blocks


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_entry(entry: Path) -> BlockStats | None:
    """The entry's stats if it is complete and consistent; anything else is treated as absent."""
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        stats = BlockStats(**{k: v for k, v in meta.items() if k != "format"})
        sound = meta["format"] == FORMAT_VERSION and stats.n_blocks >= 1
        expected_size = stats.n_blocks * stats.seq_len * np.dtype(stats.dtype).itemsize
        sound = sound and (entry / "blocks.bin").stat().st_size == expected_size
    except (OSError, ValueError, TypeError, KeyError):
        sound = False
    if not sound:
        log.warning("ignoring the damaged cache entry %s", entry)
        return None
    return stats
