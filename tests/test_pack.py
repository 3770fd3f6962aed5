"""Packing: the blocks are exactly the EOS-separated token stream, cached once and never half-used."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import cpt.data.pack as pack
from cpt.config.data import DomainConfig
from cpt.config.tokenizer import TrainTokenizerConfig
from cpt.data.pack import block_stats, cache_path, load_blocks
from cpt.data.sources import iter_documents
from cpt.data.tokenizer import train_tokenizer
from cpt.errors import CptError

SEQ = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """A small byte-level BPE tokenizer trained on a few real standard-library modules."""
    code = DomainConfig(source="builtin:python-stdlib")
    out = tmp_path_factory.mktemp("tok") / "bpe"
    cfg = TrainTokenizerConfig(vocab_size=500, max_documents=30)
    return train_tokenizer(cfg, iter_documents(code, "train", 0), out)


@pytest.fixture
def corpus(tmp_path: Path) -> DomainConfig:
    texts = [f"def f{i}(x):\n    return x * {i}  # document {i}\n" * (1 + i % 3) for i in range(40)]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return DomainConfig(source=str(path), heldout=4)


def token_stream(cfg: DomainConfig, split: str, tok) -> list[int]:
    """The reference: every document's ids followed by EOS, one plain encode per document."""
    stream: list[int] = []
    for text in iter_documents(cfg, split, 0):  # type: ignore[arg-type]
        stream += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return stream


def test_blocks_are_the_eos_separated_stream_without_the_partial_tail(corpus: DomainConfig, tok, tmp_path: Path):
    blocks = load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "cache")
    stream = token_stream(corpus, "train", tok)
    assert len(stream) % SEQ != 0  # so that a partial block exists to be dropped
    assert blocks.shape == (len(stream) // SEQ, SEQ)
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert (blocks == tok.eos_token_id).sum() == stream[: blocks.size].count(tok.eos_token_id) > 30
    assert isinstance(blocks, np.memmap) and blocks.dtype == np.uint16
    with pytest.raises(ValueError):
        blocks[0, 0] = 1  # read-only

    stats = block_stats(corpus, "train", tok, SEQ, 0, tmp_path / "cache")
    assert (stats.n_blocks, stats.n_tokens, stats.n_documents, stats.dtype) == (len(blocks), len(stream), 36, "uint16")


def test_small_batches_give_the_same_blocks(corpus: DomainConfig, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    whole = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "a"))
    monkeypatch.setattr(pack, "_BATCH_DOCUMENTS", 3)  # the unfinished block is carried across many batches
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "b"), whole)


def test_disabled_tokenizer_parallelism_is_reported(
    corpus: DomainConfig, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    load_blocks(corpus, "train", tok, SEQ, 0, tmp_path)
    assert "TOKENIZERS_PARALLELISM=false: tokenizing on one core" in caplog.text


def test_heldout_split_is_packed_separately(corpus: DomainConfig, tok, tmp_path: Path):
    heldout = load_blocks(corpus, "heldout", tok, 8, 0, tmp_path)
    assert heldout.reshape(-1).tolist() == token_stream(corpus, "heldout", tok)[: heldout.size]
    assert block_stats(corpus, "heldout", tok, 8, 0, tmp_path).n_documents == 4
    assert cache_path(corpus, "heldout", tok, 8, 0, tmp_path) != cache_path(corpus, "train", tok, 8, 0, tmp_path)


def test_second_load_reads_the_cache_without_tokenizing(
    corpus: DomainConfig, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    cache = tmp_path / "cache"
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, cache))
    entry = cache_path(corpus, "train", tok, SEQ, 0, cache)
    stamp = (entry / "blocks.bin").stat().st_mtime_ns

    def no_more_reading(*args, **kwargs):
        raise AssertionError("the cached split was read and tokenized again")

    monkeypatch.setattr(pack, "iter_documents", no_more_reading)
    monkeypatch.setattr(pack, "_pack", no_more_reading)
    with caplog.at_level(logging.INFO, logger="cpt.data.pack"):
        again = load_blocks(corpus, "train", tok, SEQ, 0, cache)
    assert np.array_equal(again, first)
    assert f"cached blocks at {entry}" in caplog.text
    assert (entry / "blocks.bin").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no staging leftovers
    with pytest.raises(AssertionError, match="read and tokenized again"):
        load_blocks(corpus, "train", tok, SEQ * 2, 0, cache)  # another seq_len is another entry


@pytest.mark.parametrize("damage", ["truncate", "drop-meta", "garble-meta"])
def test_a_damaged_cache_entry_is_rebuilt(
    corpus: DomainConfig, tok, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
):
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path))
    entry = cache_path(corpus, "train", tok, SEQ, 0, tmp_path)
    if damage == "truncate":
        os.truncate(entry / "blocks.bin", SEQ * 2 * 3)
    elif damage == "drop-meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text('{"n_blocks": ')
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path), first)
    assert (entry / "blocks.bin").stat().st_size == first.nbytes
    assert f"ignoring the damaged cache entry {entry}" in caplog.text


def test_concurrent_writers_publish_one_sound_entry(corpus: DomainConfig, tok, tmp_path: Path):
    cache = tmp_path / "c"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: np.array(load_blocks(corpus, "train", tok, SEQ, 0, cache)), range(2)))
    assert np.array_equal(results[0], results[1])
    assert [p.name for p in cache.iterdir()] == [cache_path(corpus, "train", tok, SEQ, 0, cache).name]


def test_a_changed_source_file_gets_a_new_entry(corpus: DomainConfig, tok, tmp_path: Path):
    before = cache_path(corpus, "train", tok, SEQ, 0, tmp_path)
    with open(corpus.source, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert cache_path(corpus, "train", tok, SEQ, 0, tmp_path) != before
    assert cache_path(corpus, "train", tok, SEQ, 1, tmp_path) != cache_path(corpus, "train", tok, SEQ, 0, tmp_path)


def test_a_domain_without_one_full_block_is_an_error(tmp_path: Path, tok):
    path = tmp_path / "tiny.txt"
    path.write_text("x = 1\n")
    with pytest.raises(CptError, match=r"tiny.txt has \d+ tokens in 1 documents: not one full block") as err:
        load_blocks(DomainConfig(source=str(path), heldout=0), "train", tok, 64, 0, tmp_path / "cache")
    assert err.value.where == "data"
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written left behind


def test_large_vocabularies_pack_as_uint32(tmp_path: Path):
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w69999", unk_token="w0")
    path = tmp_path / "words.txt"
    path.write_text("w1 w65536 w69000 w2")
    blocks = load_blocks(DomainConfig(source=str(path), heldout=0), "train", big, 5, 0, tmp_path / "cache")
    assert blocks.dtype == np.uint32
    assert blocks.tolist() == [[1, 65536, 69000, 2, 69999]]
