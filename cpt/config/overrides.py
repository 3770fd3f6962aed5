"""Model config overrides of a stage: the RoPE settings and context size of long-context CPT.

Schema only: checked here without transformers, so ``cpt validate`` catches a bad override
before any weights are fetched; :mod:`cpt.train.model` applies them to the loaded config, where
transformers' own RoPE validation runs too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cpt.config.schema import Strict

# Per rope_scaling type: the keys transformers requires, then the optional ones it reads
# (transformers.modeling_rope_utils, the _validate_<type>_rope_parameters methods).
SCALING_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (frozenset({"factor", "original_max_position_embeddings"}),
             frozenset({"attention_factor", "beta_fast", "beta_slow"})),
    "llama3": (frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
               frozenset()),
    "longrope": (frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
                 frozenset({"factor", "attention_factor"})),
}


class RopeScaling(Strict):
    """How RoPE positions are rescaled to reach past the pre-training length, in transformers' terms
    (``rope_type`` is accepted for ``type``, so a config.json's block can be pasted as it is)."""

    type: Literal["linear", "dynamic", "yarn", "llama3", "longrope"] = Field(
        description="linear: position interpolation (Chen et al. 2023); dynamic: NTK-aware scaling that grows "
        "with the sequence; yarn: YaRN (Peng et al. 2023); llama3: Llama 3.1's per-frequency scaling; "
        "longrope: LongRoPE's per-dimension factors.",
    )
    factor: float | None = Field(
        default=None, ge=1, allow_inf_nan=False,
        description="How many times the pre-training length the positions are stretched to "
        "(all types; optional for longrope).",
    )
    original_max_position_embeddings: int | None = Field(
        default=None, gt=0, description="The pre-training context length (yarn, llama3, longrope)."
    )
    low_freq_factor: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are "
        "fully interpolated.",
    )
    high_freq_factor: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="llama3: wavelengths shorter than original_max_position_embeddings / high_freq_factor are "
        "kept; greater than low_freq_factor.",
    )
    attention_factor: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="yarn, longrope: the attention temperature; null: the type's default from factor.",
    )
    beta_fast: float | None = Field(
        default=None, allow_inf_nan=False,
        description="yarn: rotations above which dimensions are extrapolated; null: 32.",
    )
    beta_slow: float | None = Field(
        default=None, allow_inf_nan=False,
        description="yarn: rotations below which dimensions are interpolated; null: 1.",
    )
    short_factor: list[float] | None = Field(
        default=None, description="longrope: per-dimension factors for sequences within the pre-training length."
    )
    long_factor: list[float] | None = Field(
        default=None, description="longrope: per-dimension factors for longer sequences."
    )

    @model_validator(mode="before")
    @classmethod
    def _rope_type(cls, value: Any) -> Any:
        if isinstance(value, dict) and "rope_type" in value:
            if "type" in value:
                raise ValueError("give type or rope_type, not both")
            value = {("type" if k == "rope_type" else k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _keys_of_type(self) -> RopeScaling:
        required, optional = SCALING_KEYS[self.type]
        given = {k for k, v in self if v is not None and k != "type"}
        missing, extra = sorted(required - given), sorted(given - required - optional)
        if missing:
            raise ValueError(f"a {self.type} rope_scaling needs {', '.join(missing)}")
        if extra:
            takes = ", ".join(sorted(required | optional))
            raise ValueError(f"a {self.type} rope_scaling takes no {', '.join(extra)} (it takes {takes})")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
        if self.type == "yarn" and (self.beta_fast or 32) < (self.beta_slow or 1):
            raise ValueError("beta_fast must not be below beta_slow")
        return self

    def rope_parameters(self) -> dict[str, Any]:
        """The block in transformers' own keys (``rope_type``), without the unset ones."""
        given = self.model_dump(exclude_none=True)
        return {"rope_type": given.pop("type"), **given}


class ModelOverrides(Strict):
    """Config fields set on the stage's model before its weights load, and kept in its export:
    what long-context CPT changes (Xiong et al. 2023's larger RoPE base, or a RoPE scaling)."""

    rope_theta: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="RoPE base frequency; raising it (e.g. 10,000 to 500,000, Xiong et al. 2023) slows the "
        "rotation so that far positions stay apart. null: the model's.",
    )
    rope_scaling: RopeScaling | None = Field(
        default=None, description="A RoPE scaling that replaces the model's (its base stays); null: the model's."
    )
    max_position_embeddings: int | None = Field(
        default=None, gt=0,
        description="The context length the model declares (dynamic scaling and harness tasks read it); "
        "null: the model's.",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = [k for k in value if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"cannot override {', '.join(map(str, unknown))}; "
                                 f"allowed: {', '.join(cls.model_fields)}")
        return value
