"""A stage's data domains: where each one's documents come from and how its held-out split is cut.

The schema and the checks that need no files, apart from the readers (:mod:`cpt.data.sources`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cpt.config.schema import Strict

BUILTINS = ("python-stdlib", "python-docs", "python-tests")


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
        description="Read the dataset as a stream instead of downloading it first; heldout must then be "
        "a count, taken from the first documents.",
    )


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
        description="Documents held out for evaluation, never trained on: a count when >= 1, a fraction of the "
        "domain's documents (at least one) when < 1, 0 for none. A seeded random subset; the first ones "
        "of a stream.",
    )
    max_documents: int | None = Field(
        default=None,
        gt=0,
        description="Use at most this many training documents (held-out ones not counted); null: all of them.",
    )
    max_epochs: float | None = Field(
        default=None,
        gt=0,
        description="The most times a stage may repeat this domain's training tokens; a mixture that asks for more "
        "is scaled down to it, the other domains taking the rest. null: no cap.",
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
        if self.hf is not None and self.hf.streaming and 0 < self.heldout < 1:
            raise ValueError(
                "a streamed dataset has no known size: give heldout as a document count (>= 1), "
                f"not the fraction {self.heldout}"
            )
        return self


def source_kind(source: str) -> Literal["builtin", "hf", "local"]:
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("hf:"):
        return "hf"
    return "local"
