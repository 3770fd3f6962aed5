"""Vocabulary extension: new tokens learned on a domain's text, appended to a BPE tokenizer.

The new tokens are new BPE *merges*, not "added tokens". ``tokenizer.add_tokens`` makes strings
that are cut out of the raw text before the tokenizer's own pipeline runs, wherever they occur:
an added ``" the"`` would split ``" thereby"`` into ``" the" + "reby"``, ahead of the base's own
longer token, and byte-level tokenizers would need the byte-mapped form to match non-ASCII text.
Instead, BPE training is continued from where the base tokenizer stops: every word of the
domain is segmented by the base (normaliser, pre-tokenizer, BPE model), and the most frequent
adjacent pair of pieces becomes a new token, again and again. The new merges rank after every
base merge, so a word is first segmented exactly as before and the new merges then join its
pieces exactly as they were learned; a new token never spans a pre-tokenizer boundary. Every
old id keeps its string (and a string that was one old token still encodes to it); only text
that the base split into several pieces can come out shorter, which is the point.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from cpt.errors import CptError
from cpt.io import library_io_errors, staged_dir, write_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

RECORD = "cpt_extension.json"  # beside the extended tokenizer: which ids are new and their base pieces
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_METASPACE_WORDS = re.compile(r"▁*[^▁]+|▁+")  # SentencePiece-style words when there is no pre-tokenizer

Pair = tuple[str, str]


@dataclass(frozen=True)
class Extension:
    """New token ids of an extended tokenizer and, for each, the base ids of its pieces."""

    base: PreTrainedTokenizerFast
    ids: list[int]
    pieces: list[list[int]]  # the base tokenizer's BPE of each new token's string
    init: str  # "mean" or "random": how a model initialises the new rows

    @property
    def size(self) -> int:
        """The vocabulary size a model needs: one past the last new id."""
        return self.ids[-1] + 1


def learn_merges(base: PreTrainedTokenizerFast, documents: Iterable[str], add: int, min_frequency: int) -> list[Pair]:
    """The ``add`` merges that BPE training continued from ``base`` on ``documents`` learns first.

    Pairs whose string the vocabulary already holds, and byte-fallback or special pieces, are
    never merged. Ties go to the lexicographically smaller pair, so the result is deterministic.
    """
    backend = base.backend_tokenizer
    _check_extensible(backend)
    words = _word_counts(backend, documents)
    vocab = set(base.get_vocab())
    excluded = set(base.all_special_tokens) | set(base.get_added_vocab())
    if getattr(backend.model, "byte_fallback", False):  # <0xNN> pieces stand for raw bytes, not text
        excluded |= {t for t in vocab if _BYTE_FALLBACK.fullmatch(t)}
    model = backend.model
    segments = [[t.value for t in model.tokenize(w)] for w in words]
    counts = list(words.values())
    pair_counts: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = {}
    for i, symbols in enumerate(segments):
        for pair in _pairs(symbols, excluded):
            pair_counts[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while heap and len(merges) < add:
        negative, a, b = heapq.heappop(heap)
        current = pair_counts[(a, b)]
        if current != -negative:  # stale: a fresher entry was pushed when it grew; re-queue when it shrank
            if current < -negative and current >= min_frequency:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency:
            break
        if a + b in vocab:
            continue
        vocab.add(a + b)
        merges.append((a, b))
        for i in where.pop((a, b)):
            for pair in _pairs(segments[i], excluded):
                pair_counts[pair] -= counts[i]
            segments[i] = _merge(segments[i], a, b)
            for pair in _pairs(segments[i], excluded):
                pair_counts[pair] += counts[i]
                where.setdefault(pair, set()).add(i)
                heapq.heappush(heap, (-pair_counts[pair], *pair))
    if len(merges) < add:
        raise CptError(
            f"the documents give only {len(merges)} of the {add} new tokens asked for (pairs of pieces that occur "
            f"at least min_frequency = {min_frequency} times); lower add or min_frequency, or learn from more documents"
        )
    return merges


def _check_extensible(backend: Tokenizer) -> None:
    model = json.loads(backend.to_str())["model"]
    if model["type"] != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise CptError("only BPE tokenizers without subword prefixes or suffixes can be extended "
                       f"(this one is {model['type']})")


def _word_counts(backend: Tokenizer, documents: Iterable[str]) -> Counter[str]:
    """How often each word occurs: the pieces the base's normaliser and pre-tokenizer cut the text into."""
    words: Counter[str] = Counter()
    for doc in documents:
        text = backend.normalizer.normalize_str(doc) if backend.normalizer is not None else doc
        if backend.pre_tokenizer is not None:
            words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
        else:
            words.update(_METASPACE_WORDS.findall(text))
    return words


def _pairs(symbols: list[str], excluded: set[str]) -> Iterable[Pair]:
    for a, b in zip(symbols, symbols[1:]):
        if a not in excluded and b not in excluded:
            yield a, b


def _merge(symbols: list[str], a: str, b: str) -> list[str]:
    """``symbols`` with each occurrence of ``a b`` joined, left to right, as BPE applies a merge."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def extend_tokenizer(base: PreTrainedTokenizerFast, merges: list[Pair], out_dir: Path) -> None:
    """Save ``base`` with ``merges`` appended (new ids after its last one) and :data:`RECORD`, atomically."""
    from cpt.data.tokenizer import load_tokenizer

    start = max(base.get_vocab().values()) + 1
    spec = json.loads(base.backend_tokenizer.to_str())
    model = spec["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for i, (a, b) in enumerate(merges):
        model["vocab"][a + b] = start + i
        model["merges"].append(f"{a} {b}" if as_strings else [a, b])
    pieces = [[t.id for t in base.backend_tokenizer.model.tokenize(a + b)] for a, b in merges]
    record = {"base_size": start, "tokens": [{"id": start + i, "token": a + b, "pieces": p}
                                             for i, ((a, b), p) in enumerate(zip(merges, pieces))]}
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:
        with library_io_errors(out_dir):
            base.save_pretrained(staging)
            write_text(staging / "tokenizer.json", json.dumps(spec, ensure_ascii=False))
            write_text(staging / RECORD, json.dumps(record, ensure_ascii=False, indent=1))
        extended = load_tokenizer(str(staging))  # some tokenizer classes rebuild themselves from other files
        if any(extended.convert_tokens_to_ids(a + b) != start + i for i, (a, b) in enumerate(merges)):
            raise CptError(f"{type(extended).__name__} does not take new tokens from its tokenizer.json; "
                           "set tokenizer_class to TokenizersBackend in the base's tokenizer_config.json")


def read_extension(base: PreTrainedTokenizerFast, out_dir: Path, init: str) -> Extension:
    """The :class:`Extension` that :func:`extend_tokenizer` saved in ``out_dir``."""
    tokens = json.loads((Path(out_dir) / RECORD).read_text(encoding="utf-8"))["tokens"]
    return Extension(base, [t["id"] for t in tokens], [t["pieces"] for t in tokens], init)


def tokens_per_document(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> float:
    """The mean number of tokens per document (no special tokens)."""
    if not documents:
        return 0.0
    return sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False).input_ids) / len(documents)


def compression(base: PreTrainedTokenizerFast, extended: PreTrainedTokenizerFast, documents: list[str]) -> dict:
    """Tokens per document under both tokenizers and the gain (base / extended: above 1 is shorter)."""
    before, after = tokens_per_document(base, documents), tokens_per_document(extended, documents)
    return {"documents": len(documents), "base": before, "extended": after, "gain": before / after if after else 1.0}
