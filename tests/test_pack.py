"""Packing: the blocks are exactly the EOS-separated token stream, prepared once and never half-used."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import cpt.data.encode as encode
from cpt.config.data import DomainConfig
from cpt.config.tokenizer import TrainTokenizerConfig
from cpt.data.pack import block_stats, cache_path, load_blocks, load_packed
from cpt.data.stream import Blocks
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


def flat(blocks) -> list[int]:
    return np.asarray(blocks).reshape(-1).tolist()


def test_blocks_are_the_eos_separated_stream_without_the_partial_tail(tok, tmp_path: Path):
    # The tokenizer is trained on this Python's standard library, so the stream's length varies
    # with the build: take the first corpus size whose stream ends in a partial block to be dropped.
    n = next(n for n in range(40, 60) if len(token_stream(code_corpus(tmp_path / f"{n}.jsonl", n), "train", tok)) % SEQ)
    corpus = code_corpus(tmp_path / f"{n}.jsonl", n)
    blocks = load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "cache")
    stream = token_stream(corpus, "train", tok)
    assert blocks.shape == (len(stream) // SEQ, SEQ)
    assert flat(blocks) == stream[: len(blocks) * SEQ]
    assert flat(blocks).count(tok.eos_token_id) == stream[: len(blocks) * SEQ].count(tok.eos_token_id) > 30
    assert isinstance(blocks, Blocks) and blocks.dtype == np.uint16
    assert np.array_equal(blocks[[3, 0, 3]], np.asarray(blocks)[[3, 0, 3]])
    assert np.array_equal(blocks[2:5][1], np.asarray(blocks)[3]) and len(blocks[2:5]) == 3

    stats = block_stats(corpus, "train", tok, SEQ, 0, tmp_path / "cache")
    assert (stats.n_blocks, stats.n_tokens, stats.n_documents, stats.dtype) == (len(blocks), len(stream), n - 4, "uint16")


def test_any_block_length_reads_the_same_prepared_stream(corpus: DomainConfig, tok, tmp_path: Path):
    cache = tmp_path / "cache"
    short = flat(load_blocks(corpus, "train", tok, SEQ, 0, cache))
    entries = sorted(cache.iterdir())
    long = flat(load_blocks(corpus, "train", tok, SEQ * 3, 0, cache))
    assert sorted(cache.iterdir()) == entries  # nothing prepared twice
    assert long == short[: len(long)] and len(short) - len(long) < SEQ * 3


def test_small_batches_give_the_same_blocks(corpus: DomainConfig, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    whole = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "a"))
    monkeypatch.setattr(encode, "BATCH_DOCUMENTS", 3)
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path / "b"), whole)


def test_disabled_tokenizer_parallelism_is_reported(
    corpus: DomainConfig, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    load_blocks(corpus, "train", tok, SEQ, 0, tmp_path)
    assert "TOKENIZERS_PARALLELISM=false: tokenizing on one thread" in caplog.text


def test_heldout_split_comes_from_the_same_pass(corpus: DomainConfig, tok, tmp_path: Path):
    heldout = load_blocks(corpus, "heldout", tok, 8, 0, tmp_path)
    assert flat(heldout) == token_stream(corpus, "heldout", tok)[: len(heldout) * 8]
    assert block_stats(corpus, "heldout", tok, 8, 0, tmp_path).n_documents == 4
    assert load_packed(corpus, "heldout", tok, 8, 0, tmp_path).name != load_packed(corpus, "train", tok, 8, 0, tmp_path).name


def test_second_load_reads_the_cache_without_tokenizing(
    corpus: DomainConfig, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, cache))
    entry = cache_path(corpus, tok, cache)
    files = {p: p.stat().st_mtime_ns for p in entry.rglob("*")}

    def no_more_reading(*args, **kwargs):
        raise AssertionError("the prepared split was read and tokenized again")

    monkeypatch.setattr(encode, "unit_documents", no_more_reading)
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, cache), first)
    assert {p: p.stat().st_mtime_ns for p in entry.rglob("*")} == files
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no staging leftovers
    with pytest.raises(AssertionError, match="read and tokenized again"):
        load_blocks(corpus.model_copy(update={"text_field": "body"}), "train", tok, SEQ, 0, cache)


@pytest.mark.parametrize("damage", ["truncate-tokens", "drop-meta", "garble-meta", "truncate-starts", "drop-index"])
def test_a_damaged_cache_entry_is_rebuilt(
    corpus: DomainConfig, tok, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
):
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path))
    entry = cache_path(corpus, tok, tmp_path)
    unit = entry / "units" / "u000000"
    (index,) = (entry / "splits").iterdir()
    if damage == "truncate-tokens":
        os.truncate(unit / "tokens.bin", SEQ * 2 * 3)
    elif damage == "drop-meta":
        (unit / "meta.json").unlink()
    elif damage == "truncate-starts":
        os.truncate(index / "train.starts", 8)
    elif damage == "drop-index":
        (index / "index.json").unlink()
    else:
        (unit / "meta.json").write_text('{"n_documents": ')
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path), first)
    assert (unit / "tokens.bin").stat().st_size >= first.nbytes
    assert "ignoring the damaged" in caplog.text


def test_concurrent_writers_publish_one_sound_entry(corpus: DomainConfig, tok, tmp_path: Path):
    cache = tmp_path / "c"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: np.array(load_blocks(corpus, "train", tok, SEQ, 0, cache)), range(2)))
    assert np.array_equal(results[0], results[1])
    entry = cache_path(corpus, tok, cache)
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert [p.name for p in (entry / "units").iterdir()] == ["u000000"] and len(list((entry / "splits").iterdir())) == 1


def test_a_changed_source_file_gets_a_new_entry(corpus: DomainConfig, tok, tmp_path: Path):
    before = cache_path(corpus, tok, tmp_path)
    with open(corpus.source, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert cache_path(corpus, tok, tmp_path) != before


def test_a_domain_without_one_full_block_is_an_error(tmp_path: Path, tok):
    path = tmp_path / "tiny.txt"
    path.write_text("x = 1\n")
    with pytest.raises(CptError, match=r"tiny.txt has \d+ tokens in 1 documents: not one full block") as err:
        load_blocks(DomainConfig(source=str(path), heldout=0), "train", tok, 64, 0, tmp_path / "cache")
    assert err.value.where == "data"


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
    assert np.asarray(blocks).tolist() == [[1, 65536, 69000, 2, 69999]]


# ----------------------------------------------------------------------------- boundaries and masks


def document_lengths(cfg: DomainConfig, split: str, tok) -> list[int]:
    return [len(tok.encode(text, add_special_tokens=False)) + 1 for text in iter_documents(cfg, split, 0)]


def test_document_starts_are_the_boundaries_of_the_stream(corpus: DomainConfig, tok, tmp_path: Path):
    packed = load_packed(corpus, "train", tok, SEQ, 0, tmp_path)
    starts = np.concatenate([[0], np.cumsum(document_lengths(corpus, "train", tok))[:-1]])
    assert packed.doc_starts.tolist() == [s for s in starts.tolist() if s < len(packed) * SEQ]
    assert packed.loss_mask is None  # plain text: every token is a target
    eos = np.asarray(packed.tokens).reshape(-1) == tok.eos_token_id
    assert set((packed.doc_starts[1:] - 1).tolist()) <= set(np.flatnonzero(eos).tolist())


def test_small_batches_give_the_same_starts_and_masks(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tagged_corpus(tmp_path)
    whole = load_packed(cfg, "train", tok, SEQ, 0, tmp_path / "a", metadata=True)
    monkeypatch.setattr(encode, "BATCH_DOCUMENTS", 3)
    small = load_packed(cfg, "train", tok, SEQ, 0, tmp_path / "b", metadata=True)
    for name in ("tokens", "doc_starts", "loss_mask"):
        assert np.array_equal(np.asarray(getattr(small, name)), np.asarray(getattr(whole, name))), name


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
    assert plain.name != tagged.name and tagged.loss_mask is not None
    stream, mask = [], []
    for prefix, text in iter_tagged(cfg, "train", 0):
        assert prefix.startswith("URL: site") and prefix.endswith(".example.org\n\n")
        head = tok.encode(prefix, add_special_tokens=False)
        body = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        stream += head + body
        mask += [0] * len(head) + [1] * len(body)
    n = len(tagged) * SEQ
    assert flat(tagged.tokens) == stream[:n]
    assert flat(tagged.loss_mask) == mask[:n]
    assert block_stats(cfg, "train", tok, SEQ, 0, tmp_path, metadata=True).n_masked == mask[:n].count(0) > 0
    # the text's tokens are the same in both variants
    text_tokens = np.asarray(tagged.tokens).reshape(-1)[np.asarray(tagged.loss_mask).reshape(-1) == 1].tolist()
    plain_tokens = flat(plain.tokens)
    common = min(len(text_tokens), len(plain_tokens))
    assert common > 100 and text_tokens[:common] == plain_tokens[:common]


def test_a_unit_of_another_format_is_never_read(corpus: DomainConfig, tok, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture):
    first = np.array(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path))
    entry = cache_path(corpus, tok, tmp_path)
    unit = entry / "units" / "u000000"
    meta = json.loads((unit / "meta.json").read_text())
    (unit / "meta.json").write_text(json.dumps(meta | {"format": 2}))
    (unit / "tokens.bin").write_bytes(np.zeros(meta["n_tokens"], np.uint16).tobytes())  # what a misreading would return
    for index in (entry / "splits").iterdir():
        (index / "index.json").unlink()
    assert np.array_equal(load_blocks(corpus, "train", tok, SEQ, 0, tmp_path), first)
    assert json.loads((unit / "meta.json").read_text())["format"] == encode.FORMAT
