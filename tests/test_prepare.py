"""Preparation: parallel, single-pass and sharded, with caches byte-identical for every worker and shard count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpt import cli
from cpt.config.data import DomainConfig
from cpt.config.tokenizer import TrainTokenizerConfig
from cpt.data import encode, units
from cpt.data.pack import cache_path, load_packed
from cpt.data.parallel import Shard, prepare
from cpt.data.selection import find_cut, rule, seeded_keys, text_hash
from cpt.data.sources import iter_documents, iter_tagged
from cpt.data.tokenizer import train_tokenizer
from cpt.errors import CptError, CptErrors

SEQ = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    texts = [f"def f{i}(x):\n    return x + {i}  # the {i}th line of code\n" for i in range(200)]
    return train_tokenizer(TrainTokenizerConfig(vocab_size=400), iter(texts), tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DomainConfig:
    """A glob of one large JSON-lines file (cut into byte ranges), text files and a parquet file of
    several row groups, in units of 2 kB: a dozen units whatever the number of workers."""
    monkeypatch.setattr(units, "UNIT_BYTES", 2048)
    root = tmp_path / "corpus"
    root.mkdir()
    rows = [{"text": f"def g{i}(y):\n    return y * {i}\n" * (1 + i % 5), "url": f"https://h{i % 4}.example/{i}"}
            for i in range(240)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(3):
        (root / f"b{i}.txt").write_text(f"notes number {i}\n" * 20)
    table = pa.table({"text": [f"parquet row {i} " * 8 for i in range(90)], "url": [f"https://p.example/{i}" for i in range(90)]})
    pq.write_table(table, root / "c.parquet", row_group_size=15)
    return DomainConfig(source=str(root / "*.*"), heldout=7, metadata={"field": "url"})


def contents(cfg: DomainConfig, tok, cache: Path, metadata: bool = False) -> dict[str, bytes]:
    """Every byte a reader gets: blocks, document starts and loss masks of both splits."""
    got = {}
    for split in ("train", "heldout"):
        packed = load_packed(cfg, split, tok, SEQ, 0, cache, metadata=metadata, workers=1)
        got[f"{split}.tokens"] = np.asarray(packed.tokens).tobytes()
        got[f"{split}.starts"] = np.asarray(packed.doc_starts).tobytes()
        if packed.loss_mask is not None:
            got[f"{split}.mask"] = np.asarray(packed.loss_mask).tobytes()
    return got


def files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def test_every_worker_count_and_shard_count_gives_the_same_bytes(corpus: DomainConfig, tok, tmp_path: Path):
    rows_only = corpus.model_copy(update={"source": corpus.source.replace("*.*", "[ac].*")})
    reference, reference_files = None, None
    for name, workers, shards in [("w1", 1, 1), ("w2", 2, 1), ("w3", 3, 1), ("s2", 2, 2), ("s3", 1, 3)]:
        cache = tmp_path / name
        for metadata in (False, True):
            domain = rows_only if metadata else corpus  # text files have no url to tag
            if shards > 1:
                for index in range(shards):
                    assert prepare(domain, tok, cache, 0, metadata=metadata, workers=workers,
                                   shard=Shard(index, shards)) is None
            prepare(domain, tok, cache, 0, metadata=metadata, workers=workers)
        got = contents(corpus, tok, cache) | {f"meta-{k}": v for k, v in contents(rows_only, tok, cache, True).items()}
        reference = reference or got
        reference_files = reference_files or files(cache)
        assert got == reference, name
        assert files(cache) == reference_files, name  # the cache itself, file by file
    assert len(list((tmp_path / "w1").glob("*/units/u*"))) > 12
    expected = []
    for text in iter_documents(corpus, "train", 0):
        expected += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    train = np.frombuffer(reference["train.tokens"], dtype=np.uint16).tolist()
    assert train == expected[: len(train)]  # the documents in source order, as one stream


def test_a_cap_reads_only_the_first_units(corpus: DomainConfig, tok, tmp_path: Path):
    capped = corpus.model_copy(update={"max_documents": 30, "metadata": None})
    for workers in (1, 3):
        cache = tmp_path / f"w{workers}"
        packed = load_packed(capped, "train", tok, SEQ, 0, cache, workers=workers)
        assert packed.stats.n_documents == 30 - 7
        (index,) = cache.glob("*/splits/*/index.json")
        needed = json.loads(index.read_text())["units"]
        made = sorted(p.name for p in cache.glob("*/units/*"))
        assert [name.split("-")[0] for name in needed] == [f"u{i:06d}" for i in range(len(needed))]
        assert set(needed) <= set(made) and len(made) <= len(needed) + workers - 1  # not the dozen units
    assert contents(capped, tok, tmp_path / "w1") == contents(capped, tok, tmp_path / "w3")
    texts = list(iter_documents(capped, "train", 0)) + list(iter_documents(capped, "heldout", 0))
    assert len(texts) == 30


# ----------------------------------------------------------------------------- held-out selection


def keys_of(texts: list[str], seed: int) -> np.ndarray:
    return seeded_keys(np.array([text_hash(t) for t in texts], dtype=np.uint64), seed)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(0, 40), seed=st.integers(0, 2**32), cuts=st.lists(st.integers(0, 300)))
def test_a_count_holds_out_exactly_the_smallest_keys_however_the_pass_is_cut(n: int, k: int, seed: int, cuts: list[int]):
    texts = [f"document {i % 250}" for i in range(n)]  # duplicates share a key: the earlier one goes first
    keys = keys_of(texts, seed)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    cut = find_cut((keys[a:b] for a, b in zip(bounds, bounds[1:])), k)
    held = np.concatenate([cut.held(keys[a:b], a) for a, b in zip(bounds, bounds[1:])])
    assert held.sum() == min(k, n) == cut.n_held
    order = np.lexsort((np.arange(n), keys))
    assert set(np.flatnonzero(held)) == set(order[: min(k, n)].tolist())
    whole = find_cut([keys], k)
    assert np.array_equal(whole.held(keys, 0), held)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), fraction=st.floats(1e-6, 0.9), seed=st.integers(0, 2**32))
def test_a_fraction_holds_out_the_keys_below_it_and_at_least_one(n: int, fraction: float, seed: int):
    keys = keys_of([f"text {i}" for i in range(n)], seed)
    threshold, _ = rule(fraction)
    held = find_cut([keys], fraction).held(keys, 0)
    below = keys < np.uint64(threshold)
    assert np.array_equal(held, below) if below.any() else held.sum() == 1 and held[np.argmin(keys)]


def test_the_split_does_not_depend_on_document_order(tmp_path: Path):
    texts = [f"line {i}" for i in range(50)]
    forward, backward = tmp_path / "f.jsonl", tmp_path / "b.jsonl"
    forward.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    backward.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    for heldout in (6, 0.2):
        f = set(iter_documents(DomainConfig(source=str(forward), heldout=heldout), "heldout", 5))
        b = set(iter_documents(DomainConfig(source=str(backward), heldout=heldout), "heldout", 5))
        assert f == b and f


# ----------------------------------------------------------------------------- the command and bad input


RECIPE = """
name: prep
seed: 0
output_dir: {out}/run
cache_dir: {out}/cache
stages:
  - name: cpt
    model:
      config: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
               num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    tokenizer: {{path: {tok}}}
    data:
      code: {{source: "{source}", heldout: 7, metadata: {{field: url}}}}
      prose: {{source: "builtin:python-docs", heldout: 4, max_documents: 30}}
    schedule: {{type: constant, lr: 1.0e-3}}
    steps: 4
    seq_len: 16
    batch: {{global_batch_size: 4, micro_batch_size: 2}}
"""


@pytest.fixture
def recipe(corpus: DomainConfig, tok, tmp_path: Path) -> Path:
    path = tmp_path / "prep.yaml"
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    path.write_text(RECIPE.format(out=tmp_path, tok=tok_dir, source=corpus.source.replace("*.*", "[ac].*")))
    return path


def test_prepare_shards_then_stitch_then_plan_reads_it(recipe: Path, tmp_path: Path, capsys, monkeypatch):
    for shard in ("0/2", "1/2"):
        assert cli.main(["prepare", str(recipe), "--shard", shard, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "shard 1/2 done" in out and "unit(s) of" in out
    assert not list((tmp_path / "cache").glob("blocks/*/splits/*"))  # shards never stitch
    before = {p for p in (tmp_path / "cache").rglob("units/*")}

    def no_tokenizing(job):
        raise AssertionError(f"{job.out} was tokenized again")

    monkeypatch.setattr("cpt.data.parallel.encode_unit", no_tokenizing)
    assert cli.main(["prepare", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "code: " in out and "code (with metadata): " in out and "prose: " in out
    assert "builtin:python-docs: " in out and " files of Python " in out  # the build the builtin corpus reads
    assert {p for p in (tmp_path / "cache").rglob("units/*")} == before
    assert cli.main(["plan", str(recipe)]) == 0
    assert "data builtin:python-docs: " in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--shard", "3/2"], "argument --shard: 3/2: the shard index must be at least 0 and below the shard count"),
    (["--shard", "one/two"], "argument --shard: expected i/n with whole numbers"),
    (["--workers", "0"], "expected a whole number >= 1"),
])
def test_bad_arguments_are_one_error_line(recipe: Path, args: list[str], message: str, capsys):
    assert cli.main(["prepare", str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_unreadable_file_midway_leaves_no_index(corpus: DomainConfig, tok, tmp_path: Path):
    root = Path(corpus.source).parent
    lines = (root / "a.jsonl").read_text().splitlines()
    lines[200] = '{"text": "cut short'
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    plain = corpus.model_copy(update={"metadata": None})
    for workers in (1, 2):
        with pytest.raises(CptError, match=r"a.jsonl:201: expected one JSON object per line") as err:
            prepare(plain, tok, tmp_path / "cache", 0, workers=workers)
        assert err.value.where == "source"
    entry = cache_path(plain, tok, tmp_path / "cache")
    assert not (entry / "splits").exists()  # nothing a reader would use
    assert not list(entry.glob("units/.tmp*"))


def test_a_file_that_cannot_be_read_midway_is_one_error(corpus: DomainConfig, tok, tmp_path: Path):
    (Path(corpus.source).parent / "b.jsonl.gz").write_bytes(b"not gzip at all" * 100)  # between a.jsonl and b0.txt
    plain = corpus.model_copy(update={"metadata": None})
    for workers in (1, 2):
        with pytest.raises(CptError, match=r"cannot read .*b.jsonl.gz") as err:
            prepare(plain, tok, tmp_path / "cache", 0, workers=workers)
        assert err.value.where == "source"
    assert not list((tmp_path / "cache").glob("*/splits"))


def test_a_dying_worker_is_an_error_and_the_next_run_finishes(corpus: DomainConfig, tok, tmp_path: Path, monkeypatch):
    plain = corpus.model_copy(update={"metadata": None})
    monkeypatch.setenv("CPT_FAULT", "prepare.unit@2:kill")  # each worker dies at its second unit
    with pytest.raises(CptError, match="a preparation worker died") as err:
        prepare(plain, tok, tmp_path / "cache", 0, workers=2)
    assert err.value.where == plain.source
    entry = cache_path(plain, tok, tmp_path / "cache")
    assert not (entry / "splits").exists()
    kept = list(entry.glob("units/u*"))
    assert all(encode.read_unit(unit) is not None for unit in kept)
    monkeypatch.delenv("CPT_FAULT")
    assert contents(plain, tok, tmp_path / "cache") == contents(plain, tok, tmp_path / "again")


def test_tagged_and_plain_units_hold_the_same_texts(corpus: DomainConfig, tok, tmp_path: Path):
    rows = corpus.model_copy(update={"source": corpus.source.replace("*.*", "[ac].*")})
    prefixes = [p for p, _ in iter_tagged(rows, "train", 0)]
    assert prefixes and all(p.startswith("URL: ") for p in prefixes)
    tagged = load_packed(rows, "train", tok, SEQ, 0, tmp_path, metadata=True, workers=2)
    plain = load_packed(rows, "train", tok, SEQ, 0, tmp_path, workers=2)
    assert tagged.stats.n_documents == plain.stats.n_documents and tagged.stats.n_masked > 0


def test_a_dataset_in_row_ranges_a_stream_in_shards_and_the_files_give_the_same_splits(
    corpus: DomainConfig, tok, tmp_path: Path, monkeypatch
):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    lines = (Path(corpus.source).parent / "a.jsonl").read_text().splitlines(keepends=True)
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, path in enumerate(parts):
        path.write_text("".join(lines[i * 80 : (i + 1) * 80]))
    names = [str(path) for path in parts]
    local = DomainConfig(source=str(tmp_path / "part*.jsonl"), heldout=5)
    prepared = DomainConfig(source="hf:json", hf={"data_files": names}, heldout=5)
    streamed = DomainConfig(source="hf:json", hf={"data_files": names, "streaming": True}, heldout=5)
    assert len(units.plan_units(prepared)) > 3 and len(units.plan_units(streamed)) == 3
    reference = contents(local, tok, tmp_path / "local")
    for cfg in (prepared, streamed):
        got = {}
        for split in ("train", "heldout"):
            packed = load_packed(cfg, split, tok, SEQ, 0, tmp_path / "hub", workers=2)
            got[f"{split}.tokens"] = np.asarray(packed.tokens).tobytes()
            got[f"{split}.starts"] = np.asarray(packed.doc_starts).tobytes()
        assert got == reference, cfg.hf


def test_errors_cross_from_workers_whole():
    import pickle

    error = CptError("a message", where="a place")
    assert str(pickle.loads(pickle.dumps(error))) == "a place: a message"
    several = CptErrors([error, CptError("another", where="elsewhere")])
    assert [str(e) for e in pickle.loads(pickle.dumps(several)).errors] == ["a place: a message", "elsewhere: another"]


def test_no_heldout_and_a_cap_beyond_the_corpus(corpus: DomainConfig, tok, tmp_path: Path):
    plain = corpus.model_copy(update={"metadata": None, "heldout": 0, "max_documents": 10**6})
    packed = load_packed(plain, "train", tok, SEQ, 0, tmp_path, workers=2)
    assert packed.stats.n_documents == len(list(iter_documents(plain, "train", 0))) > 300
    with pytest.raises(CptError, match="has 0 tokens in 0 documents"):
        load_packed(plain, "heldout", tok, SEQ, 0, tmp_path)
    made = sorted(p.name for p in tmp_path.glob("*/units/*"))
    assert not [name for name in made if "-first" in name]  # units the cap did not cut are whole units
