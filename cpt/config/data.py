"""A stage's data domains: where each one's documents come from, how its held-out split is cut, and
the metadata prefix of its documents.

The schema and the checks that need no files, apart from the readers (:mod:`cpt.data.sources`).
"""

from __future__ import annotations

import functools
import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cpt.config.schema import Strict
from cpt.data.files import suffix_format

BUILTINS = ("python-stdlib", "python-docs", "python-tests")
# Placeholders of a metadata template that name the metadata value, never a row field.
VALUE_PLACEHOLDERS = frozenset({"value", "host"})


class HFOptions(Strict):
    """Arguments passed through to ``datasets.load_dataset``."""

    name: str | None = Field(
        default=None, description="The dataset's configuration (subset) name: load_dataset's second argument."
    )
    split: str = Field(default="train", description="The dataset split to read documents from.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        default=None,
        description="Files for a builder such as hf:json or hf:parquet: a path or glob, a list of them, "
        "or a mapping from split name to them.",
    )
    revision: str | None = Field(
        default=None, description="Branch, tag or commit of the hub dataset; null: its default branch."
    )
    streaming: bool = Field(
        default=False,
        description="Read the dataset as a stream instead of downloading it first: read once as it streams, "
        "with the same held-out split as the same documents read any other way.",
    )


class MetadataConfig(Strict):
    """The metadata prefix of each document (MeCo: ``URL: <host>`` before the text, not trained on)."""

    field: str | None = Field(
        default=None,
        min_length=1,
        description="The JSON field, parquet column or dataset column holding each document's metadata value, "
        "e.g. url; only for sources with rows. A missing or null value is an error; numbers are written as text.",
    )
    value: str | None = Field(
        default=None,
        min_length=1,
        description="One metadata value for every document of the domain (a tag), instead of field. Without "
        "both, builtin corpora use their own: a module's path (python-stdlib, python-tests), a pydoc topic or a "
        "module's dotted name (python-docs); text files their path from the source's directory before any "
        "wildcard (a single file: its name).",
    )
    template: str = Field(
        default="URL: {host}\n\n",
        description="The prefix, a Python format string put right before the text, so it ends with its own "
        "separator (the default ends in a blank line: `URL: {host}\\n\\n`). {value} is the metadata value; {host} "
        "its host when it is a URL with a network location (https://en.wikipedia.org/wiki/X: en.wikipedia.org), "
        "else the whole value (a scheme-less www.example.com/x too); any other name is a field of the document's "
        "row, e.g. {url} (JSON lines, parquet, hf: datasets).",
    )

    @field_validator("template")
    @classmethod
    def _valid_template(cls, template: str) -> str:
        try:
            names = template_names(template)
        except ValueError as e:
            raise ValueError(f"not a format template: {e}") from None
        unnamed = [name for name in names if not _plain_name(name)]
        if unnamed:
            raise ValueError(
                f"placeholders must be plain names such as {{value}}, {{host}} or {{url}}, not {{{unnamed[0]}}}"
            )
        try:
            template.format(**dict.fromkeys(names, "x"))
        except (ValueError, KeyError, IndexError) as e:
            raise ValueError(f"template cannot be formatted: {e}") from None
        if not template.strip():
            raise ValueError("template gives an empty prefix")
        return template

    @model_validator(mode="after")
    def _one_value(self) -> MetadataConfig:
        if self.field is not None and self.value is not None:
            raise ValueError("give field (a value per document) or value (one for all), not both")
        if (self.field is not None or self.value is not None) and not self.uses_value:
            given = "field" if self.field is not None else "value"
            raise ValueError(f"{given} is unused: the template names neither {{value}} nor {{host}}")
        return self

    @property
    def uses_value(self) -> bool:
        return bool(template_names(self.template) & VALUE_PLACEHOLDERS)

    @property
    def natural(self) -> bool:
        """Whether the metadata value is the source's own: a builtin module's or a text file's name."""
        return self.uses_value and self.field is None and self.value is None

    @property
    def row_fields(self) -> tuple[str, ...]:
        """The fields each row must have: the metadata field, then those the template names."""
        named = sorted(template_names(self.template) - VALUE_PLACEHOLDERS)
        return tuple(dict.fromkeys([self.field, *named] if self.field is not None else named))


@functools.cache
def template_names(template: str) -> frozenset[str]:
    """The placeholders of a format template (cached: prefixes are formatted once per document)."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name is not None)


def _plain_name(name: str) -> bool:
    """A keyword placeholder: not positional ({} or {0}), no attribute or index ({a.b}, {a[0]})."""
    return bool(name) and not name.isdigit() and not any(char in name for char in ".[")


def metadata_problem(meta: MetadataConfig, rows: bool) -> str | None:
    """Why ``meta`` cannot tag documents that are rows with fields (``rows``) or whole texts, if it cannot."""
    if rows and meta.natural:
        return (
            "rows have no metadata value of their own: set metadata.field (e.g. url) or metadata.value, "
            "or name row fields in the template, e.g. {url}"
        )
    if not rows and meta.row_fields:
        fields = ", ".join(meta.row_fields)
        return (
            f"documents without rows (builtin corpora, text files) have no fields to read ({fields}): "
            "their metadata value is metadata.value or their own name, and the template names only {value} and {host}"
        )
    return None


class DomainConfig(Strict):
    """Where one domain's documents come from and how its held-out split is cut."""

    source: str = Field(
        description="builtin:python-stdlib, builtin:python-docs or builtin:python-tests; `hf:<dataset id or builder>`; "
        "or a local file or glob (.txt/.md/.rst/.text: one document per file; .jsonl/.json: one JSON object "
        "per line; .parquet; text and JSON lines may be gzipped)."
    )
    text_field: str = Field(
        default="text",
        min_length=1,
        description="The JSON field or column holding a document's text (JSON lines, parquet, hf: datasets).",
    )
    hf: HFOptions | None = Field(
        default=None, description="Options for datasets.load_dataset; only for hf: sources."
    )
    heldout: float = Field(
        default=0.05,
        description="Documents held out for evaluation, never trained on: a count when >= 1 (the documents with "
        "the smallest seeded hashes of their text: exactly that many, whatever order or number of processes reads "
        "them), a fraction when < 1 (those whose seeded hash falls below it: about that share, at least one), "
        "0 for none. Chosen in the same single pass as tokenization, streams included.",
    )
    max_documents: int | None = Field(
        default=None,
        gt=0,
        description="Read only the source's first this-many non-empty documents; the held-out split is cut from "
        "them. null: all of them.",
    )
    max_epochs: float | None = Field(
        default=None,
        gt=0,
        description="The most times a stage may repeat this domain's training tokens; a mixture that asks for more "
        "is scaled down to it, the other domains taking the rest. null: no cap.",
    )
    metadata: MetadataConfig | None = Field(
        default=None,
        description="A metadata prefix for each document, for metadata conditioning (MeCo); null: none.",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a builtin corpus, an hf: dataset, or a local file or glob")
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BUILTINS:
            known = ", ".join(f"builtin:{name}" for name in BUILTINS)
            raise ValueError(f"unknown builtin corpus {value!r}; known: {known}")
        if value.startswith("hf:") and not value.removeprefix("hf:").strip():
            raise ValueError("hf: needs a hub dataset id or a builder name, e.g. hf:json")
        return value

    @field_validator("heldout")
    @classmethod
    def _heldout_size(cls, value: float) -> float:
        if value < 0:
            raise ValueError("must be >= 0")
        if value >= 1 and value != int(value):
            raise ValueError("must be a whole number of documents when >= 1, or a fraction of them when < 1")
        return value

    @model_validator(mode="after")
    def _hf_options_fit_source(self) -> DomainConfig:
        if self.hf is not None and source_kind(self.source) != "hf":
            raise ValueError(f"hf options apply only to hf: sources, not to {self.source!r}")
        rows = source_rows(self.source)
        problem = self.metadata and rows is not None and metadata_problem(self.metadata, rows)
        if problem:
            raise ValueError(f"metadata: {problem}")
        return self


def source_kind(source: str) -> Literal["builtin", "hf", "local"]:
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("hf:"):
        return "hf"
    return "local"


def source_rows(source: str) -> bool | None:
    """Whether a source's documents are rows with fields; None for a glob that may match files of both kinds."""
    kind = source_kind(source)
    if kind != "local":
        return kind == "hf"
    form = suffix_format(source)
    return None if form is None else form != "text"
