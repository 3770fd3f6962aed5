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
from cpt.data.pack import block_stats, cache_path, load_blocks, load_packed
from cpt.data.sources import iter_documents, iter_tagged
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


def code_corpus(path: Path, n: int) -> DomainConfig:
    texts = [f"def f{i}(x):\n    return x * {i}  # document {i}\n" * (1 + i % 3) for i in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return DomainConfig(source=str(path), heldout=4)


@pytest.fixture
def corpus(tmp_path: Path) -> DomainConfig:
    return code_corpus(tmp_path / "code.jsonl", 40)


def token_stream(cfg: DomainConfig, split: str, tok) -> list[int]:
    """The reference: every document's ids followed by EOS, one plain encode per document."""
    stream: list[int] = []
    for text in iter_documents(cfg, split, 0):  # type: ignore[arg-type]
        stream += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return stream


def test_blocks_are_the_eos_separated_stream_without_the_partial_tail(tok, tmp_path: Path):
    # The tokenizer is trained on this Python's standard library, so the stream's length varies
    # with the build: take the first corpus size whose stream ends in a partial block to be dropped.
    n = next(n for n in range(40, 60) if len(token_stream(code_corpus(tmp_path / f"{n}.jsonl", n), "train", tok)) % SEQ)
    corpus = code_corpus(tmp_path / f"{n}.jsonl", n)
    blocks = load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "cache")
    stream = token_stream(corpus, "train", tok)
    assert blocks.shape == (len(stream) // SEQ, SEQ)
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert (blocks == tok.eos_token_id).sum() == stream[: blocks.size].count(tok.eos_token_id) > 30
    assert isinstance(blocks, np.memmap) and blocks.dtype == np.uint16
    with pytest.raises(ValueError):
        blocks[0, 0] = 1  # read-only

    stats = block_stats(corpus, "train", tok, SEQ, 0, tmp_path / "cache")
    assert (stats.n_blocks, stats.n_tokens, stats.n_documents, stats.dtype) == (len(blocks), len(stream), n - 4, "uint16")


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


@pytest.mark.parametrize("damage", ["truncate", "drop-meta", "garble-meta", "truncate-starts"])
def test_a_damaged_cache_entry_is_rebuilt(
    corpus: DomainConfig, tok, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
):
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path))
    entry = cache_path(corpus, "train", tok, SEQ, 0, tmp_path)
    if damage == "truncate":
        os.truncate(entry / "blocks.bin", SEQ * 2 * 3)
    elif damage == "drop-meta":
        (entry / "meta.json").unlink()
    elif damage == "truncate-starts":
        os.truncate(entry / "doc_starts.bin", 8)
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


# ----------------------------------------------------------------------------- format 2


def document_lengths(cfg: DomainConfig, split: str, tok) -> list[int]:
    return [len(tok.encode(text, add_special_tokens=False)) + 1 for text in iter_documents(cfg, split, 0)]


def test_document_starts_are_the_boundaries_of_the_stream(corpus: DomainConfig, tok, tmp_path: Path):
    packed = load_packed(corpus, "train", tok, SEQ, 0, tmp_path)
    starts = np.concatenate([[0], np.cumsum(document_lengths(corpus, "train", tok))[:-1]])
    assert packed.doc_starts.tolist() == [s for s in starts.tolist() if s < packed.tokens.size]
    assert packed.loss_mask is None  # plain text: every token is a target
    eos = packed.tokens.reshape(-1) == tok.eos_token_id
    assert set((packed.doc_starts[1:] - 1).tolist()) <= set(np.flatnonzero(eos).tolist())


def test_small_batches_give_the_same_starts_and_masks(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tagged_corpus(tmp_path)
    whole = load_packed(cfg, "train", tok, SEQ, 0, tmp_path / "a", metadata=True)
    monkeypatch.setattr(pack, "_BATCH_DOCUMENTS", 3)
    small = load_packed(cfg, "train", tok, SEQ, 0, tmp_path / "b", metadata=True)
    for name in ("tokens", "doc_starts", "loss_mask"):
        assert np.array_equal(getattr(small, name), getattr(whole, name)), name


def tagged_corpus(tmp_path: Path) -> DomainConfig:
    rows = [{"text": f"print({i})\n" * (1 + i % 4), "url": f"https://site{i % 3}.example.org/page/{i}"}
            for i in range(30)]
    path = tmp_path / "tagged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DomainConfig(source=str(path), heldout=3, metadata={"field": "url"})


def test_the_metadata_variant_prefixes_each_document_and_masks_the_prefix(tok, tmp_path: Path):
    cfg = tagged_corpus(tmp_path)
    plain = load_packed(cfg, "train", tok, SEQ, 0, tmp_path)
    tagged = load_packed(cfg, "train", tok, SEQ, 0, tmp_path, metadata=True)
    assert plain.entry != tagged.entry and tagged.loss_mask is not None
    stream, mask = [], []
    for prefix, text in iter_tagged(cfg, "train", 0):
        assert prefix.startswith("URL: site") and prefix.endswith(".example.org\n\n")
        head = tok.encode(prefix, add_special_tokens=False)
        body = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        stream += head + body
        mask += [0] * len(head) + [1] * len(body)
    n = tagged.tokens.size
    assert tagged.tokens.reshape(-1).tolist() == stream[:n]
    assert tagged.loss_mask.reshape(-1).tolist() == mask[:n]
    assert block_stats(cfg, "train", tok, SEQ, 0, tmp_path, metadata=True).n_masked == mask[:n].count(0) > 0
    # the text's tokens are the same in both variants
    text_tokens = tagged.tokens.reshape(-1)[tagged.loss_mask.reshape(-1) == 1].tolist()
    plain_tokens = plain.tokens.reshape(-1).tolist()
    common = min(len(text_tokens), len(plain_tokens))
    assert common > 100 and text_tokens[:common] == plain_tokens[:common]


def test_an_entry_of_the_first_format_is_never_read(corpus: DomainConfig, tok, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture):
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path))
    entry = cache_path(corpus, "train", tok, SEQ, 0, tmp_path)
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(meta | {"format": 1}))
    (entry / "blocks.bin").write_bytes(np.zeros_like(first).tobytes())  # what a misreading would return
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path), first)
    assert "of format 1" in caplog.text
    assert '"format": 1' not in (entry / "meta.json").read_text()


def test_the_plain_entry_knows_its_name_under_the_first_format(corpus: DomainConfig, tok, tmp_path: Path):
    """A checkpoint of a run from before format 2 pinned that name; the tokens are the same, so it resumes."""
    import hashlib

    from cpt.data.sources import fingerprint
    from cpt.data.tokenizer import tokenizer_fingerprint

    key = json.dumps([fingerprint(corpus, 0), tokenizer_fingerprint(tok), SEQ, "train", 1])  # format 1's key
    assert load_packed(corpus, "train", tok, SEQ, 0, tmp_path).former_names() == (
        f"train-{hashlib.sha256(key.encode()).hexdigest()[:20]}",
    )
    assert load_packed(tagged_corpus(tmp_path), "train", tok, SEQ, 0, tmp_path, metadata=True).former_names() == ()
