"""The tokenizer of a stage: a Hugging Face tokenizer by path or hub id, or one trained on the recipe's data."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from cpt.config.schema import Strict


class TrainTokenizerConfig(Strict):
    """A byte-level BPE tokenizer trained on the training documents of the run."""

    vocab_size: int = Field(
        ge=300,
        description="Size of the vocabulary: the 256 byte symbols, the end-of-text and padding tokens, and merges.",
    )
    min_frequency: int = Field(
        default=2, ge=1, description="A pair of symbols becomes a merge only if it occurs at least this often."
    )
    max_documents: int | None = Field(
        default=None,
        gt=0,
        description="Train on at most this many documents, taken in turn from each domain; null: all of them.",
    )


class TokenizerConfig(Strict):
    """Either an existing tokenizer (a directory or hub id) or one to train."""

    path: str | None = Field(
        default=None,
        description="A tokenizer directory or hub id; it must be fast and have an end-of-sequence token. "
        "Give this or train.",
    )
    train: TrainTokenizerConfig | None = Field(
        default=None,
        description="Train a byte-level BPE tokenizer on the training documents of every domain of the recipe "
        "(cached); give this or path.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        """``tokenizer: PATH`` is short for ``tokenizer: {path: PATH}``."""
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizerConfig:
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of path (an existing tokenizer) or train (options to train one)")
        return self
