"""The training side of a stage's schema: processes and precision, the optimizer, memory savers, the weight EMA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cpt.config.schema import Strict


class DistributedConfig(Strict):
    """How the run is spread over processes (the recipe's ``distributed`` block)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        default=0,
        description="DeepSpeed ZeRO stage: 0 plain data parallelism; 1 partitions the optimizer state over "
        "processes, 2 the gradients too, 3 the weights too.",
    )
    num_processes: int = Field(
        default=1,
        ge=1,
        description="Processes per node (deepspeed --num_gpus); with a hostfile, each listed host runs this many.",
    )
    offload_optimizer: bool = Field(
        default=False, description="Keep the optimizer state in CPU memory (ZeRO-Offload); needs zero_stage 1, 2 or 3."
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="Training precision; bf16 needs an accelerator that supports it, and the exported weights keep it.",
    )
    hostfile: str | None = Field(
        default=None,
        description="A DeepSpeed hostfile (one `<host> slots=<K>` line per node) for a multi-node run started "
        "on the first host; null: this machine only.",
    )
    master_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of the processes' rendezvous on the first host; null: a free port, "
        "or DeepSpeed's default 29500 with a hostfile.",
    )

    peak_flops: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Peak dense FLOP/s of one process's accelerator at the run's precision, for the `mfu` of "
        "training records; null: known for common GPUs (A100, H100, H200, B200, L40S, L4, MI300X, ...), "
        "no `mfu` otherwise (and on CPUs).",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DistributedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3: the optimizer state is what ZeRO offloads")
        return self


class OptimizerConfig(Strict):
    """AdamW and the update policy. Weight decay applies to matrices only, not to biases and norms."""

    weight_decay: float = Field(
        default=0.1,
        ge=0,
        allow_inf_nan=False,
        description="AdamW's decoupled weight decay, applied to weight matrices only (not to biases and norms).",
    )
    betas: tuple[float, float] = Field(
        default=(0.9, 0.95),
        description="AdamW's decay rates of the first and second moment estimates, each in [0, 1).",
    )
    eps: float = Field(
        default=1e-8, gt=0, allow_inf_nan=False, description="AdamW's epsilon, added to the denominator for stability."
    )
    grad_clip: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="Largest global gradient norm; larger gradients are scaled down to it. 0 turns clipping off.",
    )
    max_nonfinite: int = Field(
        default=10,
        ge=0,
        description="A step whose loss or gradient is non-finite is skipped (no update); the run stops "
        "with an error once a stage has skipped more than this many.",
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must both lie in [0, 1)")
        return self


class MemoryConfig(Strict):
    """Trading compute for memory within a stage (``stages[].memory``)."""

    activation_checkpointing: bool = Field(
        default=False,
        description="Keep only each transformer block's input during the forward pass and recompute the rest "
        "in the backward pass (non-reentrant gradient checkpointing): activation memory drops from every "
        "layer's to about one block's, for roughly a third more compute. Same loss and gradients.",
    )


class EmaConfig(Strict):
    """``ema: {decay: 0.999}``: after every update, ema = decay * ema + (1 - decay) * weights."""

    decay: float = Field(
        gt=0,
        lt=1,
        description="Weight of the old average in each update; the average spans roughly the last "
        "1 / (1 - decay) updates.",
    )
    export: bool = Field(
        default=False,
        description="Write the average, not the trained weights, to final/ and the releases; checkpoints keep both.",
    )
