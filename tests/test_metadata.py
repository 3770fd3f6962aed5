"""Metadata prefixes of documents (MeCo): the schema, each reader's values, and texts that stay as they were."""

from __future__ import annotations

import json
import os
import sysconfig
import tokenize
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from cpt.config.data import DomainConfig, MetadataConfig
from cpt.data.builtin import documents, module_docstrings, stdlib_files, stdlib_test_files
from cpt.data.sources import check_domain, fingerprint, iter_documents, iter_tagged, metadata_fingerprint, url_host
from cpt.errors import CptError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # datasets reads it when first imported, inside the tests below

URLS = [f"https://site{i % 3}.example.org/page/{i}" for i in range(12)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def web(tmp_path: Path) -> Path:
    rows = [{"text": f"page {i}", "url": url, "lang": "en", "id": i} for i, url in enumerate(URLS)]
    return write_rows(tmp_path / "web.jsonl", rows)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def tagged(cfg: DomainConfig) -> list[tuple[str, str]]:
    return [*iter_tagged(cfg, "train", 0), *iter_tagged(cfg, "heldout", 0)]


def by_text(cfg: DomainConfig) -> dict[str, str]:
    return {text: prefix for prefix, text in tagged(cfg)}


# --- schema ---


@pytest.mark.parametrize(
    ("source", "metadata", "message"),
    [
        ("web.jsonl", {"field": "url", "value": "web"}, "not both"),
        ("web.jsonl", {"field": "url", "template": "URL: {url\n\n"}, "not a format template"),
        ("web.jsonl", {"field": "url", "template": "URL: {}\n\n"}, "placeholders must be plain names"),
        ("web.jsonl", {"field": "url", "template": "URL: {0}\n\n"}, "placeholders must be plain names"),
        ("web.jsonl", {"template": "URL: {meta[url]}\n\n"}, "placeholders must be plain names"),
        ("web.jsonl", {"field": "url", "template": "URL: {host:d}\n\n"}, "template cannot be formatted"),
        ("web.jsonl", {"value": "web", "template": " \n\n"}, "template gives an empty prefix"),
        ("web.jsonl", {"field": "url", "template": "Lang: {lang}\n\n"}, "field is unused"),
        ("web.jsonl", {"value": "web", "template": "Web\n\n"}, "value is unused"),
        ("web.jsonl", {"field": ""}, "at least 1 character"),
        ("web.jsonl", {"field": "url", "prefix": "URL"}, "Extra inputs are not permitted"),
        ("web.jsonl", {}, "rows have no metadata value of their own"),
        ("hf:some/set", {"template": "{value}\n"}, "rows have no metadata value of their own"),
        ("builtin:python-stdlib", {"field": "url"}, r"no fields to read \(url\)"),
        ("builtin:python-docs", {"template": "URL: {url}\n\n"}, r"no fields to read \(url\)"),
        ("notes/**/*.md", {"template": "{title}\n"}, r"no fields to read \(title\)"),
    ],
)
def test_config_errors(source: str, metadata: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        DomainConfig(source=source, metadata=metadata)


def test_valid_configs():
    assert MetadataConfig().template == "URL: {host}\n\n"
    DomainConfig(source="builtin:python-stdlib", metadata={})
    DomainConfig(source="notes/*.txt", metadata={"value": "notes"})
    DomainConfig(source="hf:some/set", metadata={"field": "url"})
    DomainConfig(source="web.jsonl", metadata={"template": "URL: {url}\n\n"})
    DomainConfig(source="web.jsonl", metadata={"template": "Web\n\n"})  # one constant prefix
    DomainConfig(source="mixed/*", metadata={})  # its files' kinds are known only when read


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("https://en.wikipedia.org/wiki/X", "en.wikipedia.org"),
        ("HTTP://user@Example.COM:8080/a?b#c", "example.com"),
        ("//cdn.example.net/lib.js", "cdn.example.net"),
        ("www.example.com/path", "www.example.com/path"),  # no scheme: not a URL to urllib
        ("json/decoder.py", "json/decoder.py"),
        ("mailto:someone@example.com", "mailto:someone@example.com"),
        ("http://[::1/", "http://[::1/"),  # urllib rejects it
        ("", ""),
    ],
)
def test_url_host(value: str, host: str):
    assert url_host(value) == host


# --- rows ---


def test_field_with_the_default_template(web: Path):
    prefixes = by_text(DomainConfig(source=str(web), heldout=2, metadata={"field": "url"}))
    assert prefixes == {f"page {i}": f"URL: site{i % 3}.example.org\n\n" for i in range(12)}


def test_template_of_row_fields_without_field(web: Path):
    cfg = DomainConfig(source=str(web), metadata={"template": "{lang} | {url} | {id}\n"})
    assert by_text(cfg)["page 4"] == f"en | {URLS[4]} | 4\n"  # numbers are written as text


def test_field_and_row_fields_together(web: Path):
    cfg = DomainConfig(source=str(web), metadata={"field": "url", "template": "[{lang}] {host}: {value}\n"})
    assert by_text(cfg)["page 1"] == f"[en] site1.example.org: {URLS[1]}\n"


def test_fixed_value_tags_every_document(web: Path):
    cfg = DomainConfig(source=str(web), metadata={"value": "https://web.example.com", "template": "{host} {value}\n"})
    assert set(by_text(cfg).values()) == {"web.example.com https://web.example.com\n"}


def test_parquet_and_hf_rows(tmp_path: Path, web: Path, hf_cache: None):
    parquet = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": [f"page {i}" for i in range(12)], "url": URLS}), parquet)
    expected = {f"page {i}": f"URL: site{i % 3}.example.org\n\n" for i in range(12)}
    for source, files in ((str(parquet), None), ("hf:json", web), ("hf:parquet", parquet)):
        hf = files and {"data_files": str(files)}
        assert by_text(DomainConfig(source=source, hf=hf, metadata={"field": "url"})) == expected


def test_missing_or_null_metadata_is_an_error_naming_the_row(tmp_path: Path):
    rows = write_rows(tmp_path / "rows.jsonl", [{"text": "a", "url": "http://a.org"}, {"text": "b"}])
    cfg = DomainConfig(source=str(rows), heldout=0, metadata={"field": "url"})
    with pytest.raises(CptError, match=r"rows.jsonl:2: no field 'url'") as err:
        tagged(cfg)
    assert err.value.where == "source"
    assert list(iter_documents(cfg, "train", 0)) == ["a", "b"]  # the plain texts never read metadata
    write_rows(rows, [{"text": "b"}])
    with pytest.raises(CptError, match="rows.jsonl:1: no field 'url'"):
        check_domain(cfg)  # reads as far as the first training document

    write_rows(rows, [{"text": "a", "url": "http://a.org"}, {"text": "b", "url": None}])
    with pytest.raises(CptError, match=r"rows.jsonl:2: field 'url': expected text or a number as metadata, found null"):
        tagged(cfg)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a"]}), parquet)
    with pytest.raises(CptError, match="has no column 'url'"):
        check_domain(DomainConfig(source=str(parquet), heldout=0, metadata={"field": "url"}))


# --- text files ---


def test_text_files_are_named_from_the_glob_directory(tmp_path: Path):
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "a.txt").write_text("first")
    (tmp_path / "notes" / "sub" / "b.md").write_text("second")
    cfg = DomainConfig(source=str(tmp_path / "notes" / "**" / "*.*"), heldout=0, metadata={"template": "{value}\n"})
    assert tagged(cfg) == [("a.txt\n", "first"), ("sub/b.md\n", "second")]
    single = DomainConfig(source=str(tmp_path / "notes" / "sub" / "b.md"), heldout=0, metadata={})
    assert tagged(single) == [("URL: b.md\n\n", "second")]


def test_glob_of_text_files_and_rows_fails_on_the_file_that_cannot_be_tagged(tmp_path: Path, web: Path):
    (tmp_path / "z.txt").write_text("a text file has no url")
    cfg = DomainConfig(source=str(tmp_path / "*"), heldout=0, metadata={"field": "url"})
    for read in (check_domain, tagged):
        with pytest.raises(CptError, match=r"z.txt: documents without rows .* no fields to read \(url\)") as err:
            read(cfg)
        assert err.value.where == "metadata"
    natural = DomainConfig(source=str(tmp_path / "*"), heldout=0, metadata={})
    with pytest.raises(CptError, match="web.jsonl: rows have no metadata value of their own"):
        tagged(natural)


# --- builtin corpora ---


@pytest.fixture(scope="module")
def stdlib_tagged() -> dict[str, str]:
    return by_text(DomainConfig(source="builtin:python-stdlib", metadata={}))


def test_python_stdlib_is_named_by_module_path(stdlib_tagged: dict[str, str]):
    decoder = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text(encoding="utf-8")
    assert stdlib_tagged[decoder] == "URL: json/decoder.py\n\n"  # not a URL: the whole value is the host


def test_python_docs_is_named_by_topic_and_module():
    from pydoc_data.topics import topics

    json_decoder = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py")
    names = {text: name for text, name in documents("python-docs")}
    assert names[topics["assert"]] == "assert"
    assert names[module_docstrings(json_decoder)] == "json.decoder"
    assert names[module_docstrings(json_decoder.with_name("__init__.py"))] == "json"


def test_python_tests_is_named_by_path():
    try:
        files = stdlib_test_files()
    except CptError as e:
        pytest.skip(e.message)
    grammar = files[0].parent / "test_grammar.py"
    names = {text: name for text, name in documents("python-tests")}
    assert names[grammar.read_text(encoding="utf-8")] == "test/test_grammar.py"


def test_builtin_texts_are_the_plain_readings_in_order():
    """The splits and caches of builtin corpora depend on these exact documents and their order."""
    from pydoc_data.topics import topics

    modules = stdlib_files()
    plain = []
    for path in modules:
        with tokenize.open(path) as f:
            plain.append(f.read())
    assert [text for text, _ in documents("python-stdlib")] == plain
    docs = [text for text, _ in documents("python-docs")]
    assert docs[: len(topics)] == [topics[name] for name in sorted(topics)]
    assert len(docs) == len(topics) + len(modules)
    sample = range(len(topics), len(docs), 25)  # parsing every module again would take seconds
    assert [docs[i] for i in sample] == [module_docstrings(modules[i - len(topics)]) for i in sample]


# --- the texts, their splits and caches stay as they were ---


def domains(tmp_path: Path, web: Path) -> list[DomainConfig]:
    (tmp_path / "notes").mkdir()
    for i in range(6):
        (tmp_path / "notes" / f"{i}.txt").write_text(f"note {i}")
    return [
        DomainConfig(source="builtin:python-stdlib", metadata={}),
        DomainConfig(source=str(tmp_path / "notes" / "*.txt"), heldout=2, metadata={"value": "notes"}),
        DomainConfig(source=str(web), heldout=0.25, max_documents=5, metadata={"field": "url"}),
        DomainConfig(source="hf:json", hf={"data_files": str(web)}, heldout=3, metadata={"field": "url"}),
        DomainConfig(source="hf:json", hf={"data_files": str(web), "streaming": True}, heldout=3,
                     metadata={"template": "{url}\n"}),
    ]


def test_tagged_documents_are_the_plain_documents(tmp_path: Path, web: Path, hf_cache: None):
    for cfg in domains(tmp_path, web):
        plain = cfg.model_copy(update={"metadata": None})
        for split in ("train", "heldout"):
            texts = list(iter_documents(plain, split, 7))
            assert texts and [text for _, text in iter_tagged(cfg, split, 7)] == texts
            assert list(iter_documents(cfg, split, 7)) == texts
            assert list(iter_tagged(plain, split, 7)) == [("", text) for text in texts]


def test_fingerprint_ignores_metadata(web: Path):
    plain = DomainConfig(source=str(web))
    url = DomainConfig(source=str(web), metadata={"field": "url"})
    lang = DomainConfig(source=str(web), metadata={"template": "{lang}\n"})
    assert fingerprint(plain, 0) == fingerprint(url, 0) == fingerprint(lang, 0)
    assert metadata_fingerprint(plain) is None
    assert metadata_fingerprint(url) == metadata_fingerprint(url.model_copy()) != metadata_fingerprint(lang)
