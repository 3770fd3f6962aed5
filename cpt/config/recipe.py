"""The recipe: a typed description of a continual pre-training run (stages, model, data, batch).

Loading (includes, ``--set``) is :mod:`cpt.config.load`; checks that need the whole recipe are
:mod:`cpt.config.checks`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, model_validator

from cpt.config.data import DomainConfig
from cpt.config.evaluation import EvaluationConfig
from cpt.config.mixture import MixtureConfig
from cpt.config.overrides import ModelOverrides
from cpt.config.schedule import ScheduleConfig
from cpt.config.schema import Strict
from cpt.config.tokenizer import TokenizerConfig
from cpt.config.training import DistributedConfig, EmaConfig, MemoryConfig, OptimizerConfig
from cpt.errors import CptError

STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(value: str) -> str:
    if not STAGE_NAME.match(value):
        raise ValueError("must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return value


# Names of recipes and stages become directory names.
Name = Annotated[str, AfterValidator(_check_name)]


class ModelConfig(Strict):
    """Where a stage's starting weights come from: an HF directory / hub id, a fresh config, or (with
    only overrides) the previous stage's final weights; and config fields to override on them."""

    path: str | None = Field(
        default=None,
        description="A Hugging Face model directory or hub id to load the weights from; give this or config.",
    )
    gguf_file: str | None = Field(
        default=None,
        description="A GGUF file (llama.cpp's format, often quantised) in path to load the config, the weights and, "
        "unless the stage names a tokenizer, the tokenizer from; transformers dequantises the weights to the training "
        "precision. Needs the gguf package. Under ZeRO-3 every process reads the whole file before the weights are "
        "partitioned.",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="A transformers model config (needs model_type) to build freshly initialised weights from, "
        "seeded by seed plus the stage's index; vocab_size defaults to the tokenizer's size.",
    )
    overrides: ModelOverrides | None = Field(
        default=None,
        description="Config fields set before the weights load and kept in the stage's export (long-context CPT: "
        "RoPE base, RoPE scaling, context length). Given without path and config, the stage continues from the "
        "previous stage's final weights with them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelConfig:
        if self.path is not None and self.config is not None:
            raise ValueError("give exactly one of a path / hub id or {config: {...}}")
        if self.path is None and self.config is None and self.overrides is None:
            raise ValueError("give a path / hub id, {config: {...}}, or overrides for the previous stage's weights")
        if self.gguf_file is not None and self.path is None:
            raise ValueError("gguf_file names a file in path: give it with a path / hub id")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("config needs a model_type (e.g. llama, gpt2, qwen2)")
        return self


class BatchConfig(Strict):
    """Global batch in sequences per optimizer step; accumulation follows from the world size."""

    global_batch_size: int = Field(
        gt=0,
        description="Sequences (of seq_len tokens) per optimizer step, summed over all processes; "
        "a multiple of micro_batch_size that splits evenly over the processes.",
    )
    micro_batch_size: int = Field(
        gt=0,
        description="Sequences per forward and backward pass on one process; gradients are accumulated "
        "over `global_batch_size / (micro_batch_size * processes)` passes.",
    )


class CheckpointConfig(Strict):
    every: int | None = Field(
        default=None,
        gt=0,
        description="Also checkpoint at every multiple of this many optimizer steps; null: only at the stage's end, "
        "at the end of each schedule decay and when the run is asked to stop.",
    )
    keep: int | None = Field(
        default=2,
        gt=0,
        description="How many of the stage's newest checkpoints stay on disk (older ones are deleted); null: all.",
    )


class Stage(Strict):
    name: Name = Field(
        description="The stage's name: its directory under output_dir, and how `--set` addresses it (`stages.<name>`)."
    )
    model: ModelConfig | None = Field(
        default=None,
        description="Starting weights and config overrides; null: the previous stage's final weights "
        "(the first stage must give a path or config).",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Let transformers run model code that ships with the checkpoint (custom architectures).",
    )
    tokenizer: TokenizerConfig | None = Field(
        default=None,
        description="The stage's tokenizer; null: the one in the model directory, else the previous stage's.",
    )
    data: dict[str, DomainConfig] = Field(
        default_factory=dict,
        description="The domains this stage introduces, by name (at least one); a name is defined once per recipe, "
        "and later stages can mix or replay it.",
    )
    mixture: MixtureConfig = Field(
        default_factory=MixtureConfig,
        description="Which share of every step's batch each domain gets; default: the natural proportions "
        "of the stage's own domains.",
    )
    schedule: ScheduleConfig = Field(
        description="The learning rate over the stage's steps, chosen by type; every stage starts its schedule "
        "and optimizer afresh."
    )
    steps: int | None = Field(
        default=None, gt=0, description="Length of the stage in optimizer steps; give exactly one of steps and tokens."
    )
    tokens: int | None = Field(
        default=None,
        gt=0,
        description="Length of the stage in training tokens, rounded up to whole steps of "
        "`global_batch_size * seq_len` tokens; give exactly one of steps and tokens.",
    )
    seq_len: int = Field(
        gt=1,
        description="Tokens per training sequence: documents, each ended by EOS, are packed into blocks this long.",
    )
    batch: BatchConfig = Field(description="Sequences per optimizer step and per forward pass.")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="AdamW settings and the policy for non-finite steps."
    )
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig, description="Memory savers of the stage: activation checkpointing."
    )
    document_masking: bool = Field(
        default=False,
        description="Keep each packed document to itself: position ids restart at every document, attention never "
        "crosses a document boundary, and a document's last token is not trained to predict the next document's "
        "first. Training, held-out evaluation and harness scoring alike.",
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        default="sdpa",
        description="transformers' attention backend for the stage; each honours document masking through "
        "position ids. flash_attention_2 needs the flash-attn package and a GPU.",
    )
    compile: bool = Field(
        default=False,
        description="Compile each transformer block with torch.compile (inductor; on CPU it needs a C++ compiler "
        "such as gcc). Tested with ZeRO 0 and 2.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When resumable checkpoints are saved and how many are kept."
    )
    log_every: int = Field(
        default=1,
        gt=0,
        description="Write a training record to metrics.jsonl at every multiple of this many optimizer steps "
        "(and always at the last step and after a skipped one).",
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Held-out loss and harness tasks measured during the stage."
    )
    ema: EmaConfig | None = Field(
        default=None,
        description="Keep an exponential moving average of the weights during the stage, evaluated beside them; "
        "null: none.",
    )

    @model_validator(mode="after")
    def _budget(self) -> Stage:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        if self.batch.global_batch_size % self.batch.micro_batch_size:
            raise ValueError(
                f"batch.global_batch_size {self.batch.global_batch_size} is not a multiple of "
                f"batch.micro_batch_size {self.batch.micro_batch_size}"
            )
        return self

    @property
    def continues(self) -> bool:
        """Whether the stage starts from the previous stage's final weights."""
        return self.model is None or (self.model.path is None and self.model.config is None)

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the stage; a token budget rounds up to whole steps."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step)


class Recipe(Strict):
    name: Name = Field(description="The run's name; output_dir defaults to `runs/<name>`.")
    output_dir: str | None = Field(
        default=None,
        description="The run directory: the resolved recipe, and per stage its metrics, checkpoints and final model; "
        "null: `runs/<name>`. `cpt run --output-dir` overrides it.",
    )
    seed: int = Field(
        default=0,
        description="Seed of every random choice: held-out splits, the order of training blocks, "
        "fresh weights and generated evaluation tasks.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where packed token blocks, trained tokenizers and built harness tasks are cached; "
        "null: `$CPT_CACHE_DIR`, else `~/.cache/cpt`.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Processes, ZeRO stage and precision, shared by every stage.",
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that also receive every metrics record, one run per stage: tensorboard "
        "(event files under `<stage>/tensorboard`), wandb (project: the recipe's name; `WANDB_MODE=offline` "
        "works), mlflow (`MLFLOW_TRACKING_URI`, else a file store in `<output_dir>/mlruns`); each needs its package.",
    )
    tensorboard: bool = Field(
        default=False,
        description="The same as listing tensorboard in trackers (kept for older recipes).",
    )
    stages: list[Stage] = Field(
        min_length=1,
        description="The stages, trained in order; each starts from its model or the previous stage's final weights.",
    )

    @model_validator(mode="after")
    def _defaults(self) -> Recipe:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"trackers lists one twice: {self.trackers}")
        if self.tensorboard and "tensorboard" not in self.trackers:
            self.trackers = [*self.trackers, "tensorboard"]
        return self

    def stage(self, name: str) -> Stage:
        return self.stages[stage_index([s.name for s in self.stages], name)]

    def domains(self) -> dict[str, DomainConfig]:
        """Every domain the recipe defines, in order of first definition."""
        found: dict[str, DomainConfig] = {}
        for stage in self.stages:
            found.update(stage.data)
        return found

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt"))


def stage_index(names: list, name: str) -> int:
    """Where the stage called ``name`` is among a recipe's stage ``names``; CptError naming them otherwise."""
    if name not in names:
        raise CptError(f"no stage named {name!r} (stages: {', '.join(map(str, names))})", "stages")
    return names.index(name)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: what a run writes beside its results."""
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

