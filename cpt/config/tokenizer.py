"""The tokenizer of a stage: a Hugging Face tokenizer by path or hub id, or one trained on the recipe's data."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

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


class ExtendTokenizerConfig(Strict):
    """New tokens learned on some domains' training text, appended to a BPE tokenizer; old ids keep their meaning."""

    model_config = ConfigDict(serialize_by_alias=True)  # a resolved recipe writes `from`, as recipes do

    from_: list[str] = Field(
        alias="from",
        min_length=1,
        description="The domains (known to the stage) whose training documents the new tokens are learned on.",
    )
    add: int = Field(ge=1, description="How many tokens to add; they get the ids after the base tokenizer's last one.")
    init: Literal["mean", "random"] = Field(
        default="mean",
        description="A new embedding row (input, and an untied output layer): the mean of the rows of the base "
        "tokenizer's pieces of the token (mean), or drawn from normal(0, the model's initializer_range) (random).",
    )
    min_frequency: int = Field(
        default=2, ge=1, description="A pair of pieces becomes a new token only if it occurs at least this often."
    )
    max_documents: int | None = Field(
        default=10000,
        gt=0,
        description="Learn from at most this many documents, taken in turn from each domain; null: all of them.",
    )


class TokenizerConfig(Strict):
    """An existing tokenizer (a directory or hub id) or one to train, optionally extended with new tokens."""

    path: str | None = Field(
        default=None,
        description="A tokenizer directory or hub id; it must be fast and have an end-of-sequence token. "
        "Give this or train.",
    )
    gguf_file: str | None = Field(
        default=None,
        description="Read the tokenizer from this GGUF file in path (needs the gguf package) instead of "
        "tokenizer files.",
    )
    train: TrainTokenizerConfig | None = Field(
        default=None,
        description="Train a byte-level BPE tokenizer on the training documents of every domain of the recipe "
        "(cached); give this or path.",
    )
    extend: ExtendTokenizerConfig | None = Field(
        default=None,
        description="Add tokens learned on some domains (cached) to the base tokenizer: path or train if given, "
        "else the starting model's or the previous stage's; the stage's model grows its embeddings to match.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        """``tokenizer: PATH`` is short for ``tokenizer: {path: PATH}``."""
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizerConfig:
        given = (self.path is not None) + (self.train is not None)
        if given > 1 or (given == 0 and self.extend is None):
            raise ValueError("give exactly one of path (an existing tokenizer) or train (options to train one); "
                             "with extend, neither extends the starting model's or the previous stage's tokenizer")
        if self.gguf_file is not None and self.path is None:
            raise ValueError("gguf_file names a file in path: give it with a path / hub id")
        return self
