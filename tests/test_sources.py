"""Documents per domain: builtin corpora of this Python, local files, and datasets builders offline."""

from __future__ import annotations

import gzip
import json
import os
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from cpt.config.data import BUILTINS, DomainConfig
from cpt.data import builtin
from cpt.data.builtin import module_docstrings, stdlib_files, stdlib_test_files
from cpt.data.sources import check_domain, fingerprint, iter_documents
from cpt.data.selection import heldout_size
from cpt.errors import CptError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # datasets reads it when first imported, inside the tests below


def both_splits(cfg: DomainConfig, seed: int = 0) -> tuple[list[str], list[str]]:
    return list(iter_documents(cfg, "train", seed)), list(iter_documents(cfg, "heldout", seed))


def write_jsonl(path: Path, texts: list[str | None], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture
def hundred(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "hundred.jsonl", [f"document number {i}" for i in range(100)])


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# --- builtin corpora ---


def test_stdlib_is_the_standard_library_code_without_tests():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    relative = [f.relative_to(stdlib) for f in files]
    assert stdlib / "json" / "__init__.py" in files
    assert stdlib / "collections" / "__init__.py" in files
    assert not [r for r in relative if {"test", "tests", "idlelib", "site-packages"} & set(r.parts)]
    assert files == sorted(files)

    cfg = DomainConfig(source="builtin:python-stdlib")
    train, heldout = both_splits(cfg)
    documents = train + heldout
    assert (stdlib / "json" / "decoder.py").read_text(encoding="utf-8") in documents
    non_empty = [f for f in files if f.read_text(encoding="utf-8", errors="replace").strip()]
    assert len(documents) == len(non_empty)
    assert abs(len(heldout) - 0.05 * len(documents)) < 4 * (0.05 * 0.95 * len(documents)) ** 0.5  # a seeded hash threshold


def test_python_docs_is_pydoc_topics_and_docstrings_read_without_importing():
    from pydoc_data.topics import topics

    json_init = Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py"
    json_doc = module_docstrings(json_init)
    assert json_doc.startswith("JSON (JavaScript Object Notation)")
    assert "Serialize ``obj`` to a JSON formatted ``str``." in json_doc  # json.dumps
    assert "from .decoder import" not in json_doc  # docstrings only, no code

    train, heldout = both_splits(DomainConfig(source="builtin:python-docs"))
    documents = train + heldout
    assert topics["assert"] in documents and topics["for"] in documents
    assert json_doc in documents
    assert sum(len(d.encode()) for d in documents) > 2_000_000
    assert "antigravity" not in sys.modules and "this" not in sys.modules  # importing them has side effects


def needs_test_suite() -> None:
    """Tests of builtin:python-tests skip, with the reason a recipe would get, on a Python without the suite."""
    try:
        stdlib_test_files()
    except CptError as e:
        pytest.skip(e.message)


def test_python_tests_is_the_standard_library_test_suite():
    needs_test_suite()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = both_splits(DomainConfig(source="builtin:python-tests"))
    documents = train + heldout
    assert (stdlib / "test" / "test_json" / "test_dump.py").read_text(encoding="utf-8") in documents
    assert not set(documents) & {(stdlib / "json" / "decoder.py").read_text(encoding="utf-8")}
    assert len(documents) > 500 and sum(len(d) for d in documents) > 5_000_000
    check_domain(DomainConfig(source="builtin:python-tests"))


def test_python_tests_without_the_suite_is_an_error_naming_the_package(tmp_path: Path, monkeypatch):
    """What Debian's libpython3.X-stdlib installs of test/ without libpython3.X-testsuite."""
    for name in ("__init__.py", "regrtest.py", "test_support.py", "support/__init__.py"):
        (tmp_path / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "test" / name).write_text("import unittest\n")
    paths = sysconfig.get_paths() | {"stdlib": str(tmp_path)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    cfg = DomainConfig(source="builtin:python-tests")
    package = f"libpython{sys.version_info.major}.{sys.version_info.minor}-testsuite"
    for read in (check_domain, lambda c: iter_documents(c, "train", 0)):
        with pytest.raises(CptError, match=f"needs the standard library's test suite.*install {package}") as err:
            read(cfg)
        assert err.value.where == "source"


def test_a_python_without_its_library_sources_is_an_error(tmp_path: Path, monkeypatch):
    """An embedded or stripped build (only .pyc files): the builtin code and prose corpora say so in one line."""
    paths = sysconfig.get_paths() | {"stdlib": str(tmp_path)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    for name in ("python-stdlib", "python-docs"):
        with pytest.raises(CptError, match=f"no standard library sources under {tmp_path}") as err:
            check_domain(DomainConfig(source=f"builtin:{name}"))
        assert err.value.where == "source"


def test_builtins_pass_their_checks_and_have_stable_fingerprints():
    for name in BUILTINS:  # every name the schema accepts has a reader
        if name != "python-tests":
            assert builtin.items(name)
    for name in ("python-stdlib", "python-docs"):
        cfg = DomainConfig(source=f"builtin:{name}")
        check_domain(cfg)
        assert fingerprint(cfg, 1) == fingerprint(cfg, 1) != fingerprint(cfg, 2)
        build = builtin.installation(name)  # what the fingerprint records of this Python
        assert build == {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"], "files": len(builtin.items(name))}
    code, prose = DomainConfig(source="builtin:python-stdlib"), DomainConfig(source="builtin:python-docs")
    assert fingerprint(code, 0) != fingerprint(prose, 0)


# --- held-out split ---


def test_heldout_is_disjoint_deterministic_and_in_file_order(hundred: Path):
    cfg = DomainConfig(source=str(hundred), heldout=0.1)
    train, heldout = both_splits(cfg, seed=3)
    assert 1 <= len(heldout) <= 25 and len(train) + len(heldout) == 100  # a seeded hash below 10% of its range
    assert set(train) | set(heldout) == {f"document number {i}" for i in range(100)}
    assert not set(train) & set(heldout)
    assert both_splits(cfg, seed=3) == (train, heldout)
    assert set(both_splits(cfg, seed=4)[1]) != set(heldout)
    assert train == [d for d in (f"document number {i}" for i in range(100)) if d not in heldout]  # file order kept

    counted = DomainConfig(source=str(hundred), heldout=7)
    assert len(list(iter_documents(counted, "heldout", 3))) == 7


def test_a_tiny_fraction_still_holds_out_one_document(hundred: Path):
    assert len(both_splits(DomainConfig(source=str(hundred), heldout=1e-9))[1]) == 1


@pytest.mark.parametrize(
    ("heldout", "n", "expected"), [(0.05, 100, 5), (0.05, 3, 1), (0.5, 5, 2), (0.26, 10, 3), (12, 5, 12), (0, 9, 0)]
)
def test_heldout_size(heldout: float, n: int, expected: int):
    assert heldout_size(heldout, n) == expected


def test_max_documents_reads_the_first_documents_then_splits_them(hundred: Path, tmp_path: Path):
    capped = DomainConfig(source=str(hundred), heldout=3, max_documents=15)
    train, heldout = both_splits(capped)
    first = write_jsonl(tmp_path / "first.jsonl", [f"document number {i}" for i in range(15)])
    assert (train, heldout) == both_splits(DomainConfig(source=str(first), heldout=3))
    assert len(heldout) == 3 and len(train) == 12


def test_empty_documents_are_skipped_and_not_counted(tmp_path: Path):
    path = write_jsonl(tmp_path / "gaps.jsonl", ["a", "", "  \n", None, "b", "c", "d"])
    train, heldout = both_splits(DomainConfig(source=str(path), heldout=2))
    assert sorted(train + heldout) == ["a", "b", "c", "d"]
    assert len(heldout) == 2


# --- local files ---


def test_glob_over_text_markdown_jsonl_gzip_and_parquet(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a plain text file\nwith two lines\n")
    (corpus / "b.md").write_text("# A heading\n\nmarkdown body\n")
    write_jsonl(corpus / "c.jsonl", ["json one", "json two"], field="body")
    with gzip.open(corpus / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gzipped json"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", None, "parquet two"], "n": [1, 2, 3]}), corpus / "e.parquet")
    cfg = DomainConfig(source=str(corpus / "*"), text_field="body", heldout=1)
    check_domain(cfg)
    train, heldout = both_splits(cfg)
    assert sorted(train + heldout) == sorted(
        [
            "a plain text file\nwith two lines\n",
            "# A heading\n\nmarkdown body\n",
            "json one",
            "json two",
            "gzipped json",
            "parquet one",
            "parquet two",
        ]
    )
    assert len(heldout) == 1


def test_recursive_glob(tmp_path: Path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "one.txt").write_text("one")
    (tmp_path / "x" / "y" / "two.txt").write_text("two")
    train, heldout = both_splits(DomainConfig(source=str(tmp_path / "x" / "**" / "*.txt"), heldout=0))
    assert (train, heldout) == (["one", "two"], [])


def test_fingerprint_follows_file_changes(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", ["x", "y"])
    cfg = DomainConfig(source=str(path))
    before = fingerprint(cfg, 0)
    assert fingerprint(cfg, 0) == before
    assert fingerprint(DomainConfig(source=str(path), heldout=0.5), 0) != before
    write_jsonl(path, ["x", "y", "z"])
    os.utime(path, ns=(1, 1))
    assert fingerprint(cfg, 0) != before


# --- Hugging Face datasets, offline through local builders ---


def test_hf_json_and_parquet_builders_with_local_data_files(tmp_path: Path, hf_cache: None):
    texts = [f"row {i}" for i in range(20)]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", texts)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": texts}), parquet)
    from_json = DomainConfig(source="hf:json", hf={"data_files": str(jsonl)}, heldout=5)
    from_parquet = DomainConfig(
        source="hf:parquet", hf={"data_files": [str(parquet)]}, text_field="content", heldout=5
    )
    for cfg in (from_json, from_parquet):
        check_domain(cfg)
        train, heldout = both_splits(cfg)
        assert len(heldout) == 5 and sorted(train + heldout) == sorted(texts)
    assert fingerprint(from_json, 0) != fingerprint(DomainConfig(source=str(jsonl), heldout=5), 0)
    assert both_splits(from_json) == both_splits(from_parquet) == both_splits(DomainConfig(source=str(jsonl), heldout=5))


def test_streamed_and_prepared_hf_json_give_the_same_split(tmp_path: Path, hf_cache: None):
    path = write_jsonl(tmp_path / "lines.jsonl", [f"line {i}" for i in range(30)])
    prepared = DomainConfig(source="hf:json", hf={"data_files": str(path)}, heldout=4, max_documents=20)
    streamed = DomainConfig(source="hf:json", hf={"data_files": str(path), "streaming": True}, heldout=4, max_documents=20)
    train, heldout = both_splits(streamed)
    assert (train, heldout) == both_splits(prepared)
    assert len(heldout) == 4 and len(train) == 16 and set(train + heldout) == {f"line {i}" for i in range(20)}


def test_hf_fingerprint_tracks_local_data_files(tmp_path: Path):
    path = write_jsonl(tmp_path / "rows.jsonl", ["a"])
    cfg = DomainConfig(source="hf:json", hf={"data_files": str(tmp_path / "*.jsonl")})
    before = fingerprint(cfg, 0)
    write_jsonl(path, ["a", "b"])
    os.utime(path, ns=(2, 2))
    assert fingerprint(cfg, 0) != before


def test_hf_errors_are_cpt_errors(tmp_path: Path, hf_cache: None):
    missing = DomainConfig(source="hf:json", hf={"data_files": str(tmp_path / "absent.jsonl")})
    with pytest.raises(CptError) as err:
        list(iter_documents(missing, "train", 0))
    assert err.value.where == "source" and "cannot load dataset hf:json" in err.value.message
    rows = write_jsonl(tmp_path / "r.jsonl", ["a", "b"])
    wrong_field = DomainConfig(source="hf:json", hf={"data_files": str(rows)}, text_field="body")
    with pytest.raises(CptError, match="no column 'body'"):
        list(iter_documents(wrong_field, "train", 0))


# --- configuration and filesystem errors ---


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "builtin:python-manual"}, "unknown builtin corpus"),
        ({"source": "hf:"}, "hf: needs a hub dataset id"),
        ({"source": "data/*.jsonl", "hf": {"split": "train"}}, "hf options apply only to hf: sources"),
        ({"source": "x.txt", "heldout": 2.5}, "whole number of documents"),
        ({"source": "x.txt", "heldout": -0.1}, "must be >= 0"),
        ({"source": "x.txt", "max_documents": 0}, "greater than 0"),
        ({"source": "x.txt", "max_epochs": 0}, "greater than 0"),
        ({"source": "x.txt", "text_column": "body"}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors(fields: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        DomainConfig(**fields)


def test_filesystem_errors_name_the_source(tmp_path: Path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('\nnot json\n{"text": "fine"}\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    cases = [
        (str(tmp_path / "absent.jsonl"), "no such file"),
        (str(tmp_path / "none-*.jsonl"), "no file matches"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "notes.csv"), "unknown file type"),
        (str(tmp_path / "t.parquet"), "no column 'text'"),
        (str(tmp_path / "bad.jsonl"), r"bad.jsonl:2: expected one JSON object per line"),
        (str(tmp_path / "nofield.jsonl"), r"nofield.jsonl:1: no field 'text'"),
        (str(tmp_path / "latin1.txt"), "is not UTF-8 text"),
    ]
    for source, message in cases:
        with pytest.raises(CptError, match=message) as err:
            check_domain(DomainConfig(source=source, heldout=0))
        assert err.value.where == "source"


def test_too_small_domain_for_its_heldout_split(tmp_path: Path):
    path = write_jsonl(tmp_path / "three.jsonl", ["a", "b", "c"])
    check_domain(DomainConfig(source=str(path), heldout=2))
    for heldout in (3, 0.9):
        with pytest.raises(CptError, match="has 3 non-empty document") as err:
            check_domain(DomainConfig(source=str(path), heldout=heldout))
        assert err.value.where == "heldout"
    with pytest.raises(CptError, match="has 3 non-empty document") as err:
        iter_documents(DomainConfig(source=str(path), heldout=3), "heldout", 0)
    assert err.value.where == "heldout"


def test_unknown_split_is_a_programming_error(hundred: Path):
    with pytest.raises(ValueError, match="split must be"):
        iter_documents(DomainConfig(source=str(hundred)), "validation", 0)  # type: ignore[arg-type]
