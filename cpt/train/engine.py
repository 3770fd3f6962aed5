"""The DeepSpeed engine behind ``cpt run``: one optimizer step per call, under ZeRO 0-3.

DeepSpeed does the optimization (ZeRO partitioning, gradient accumulation, clipping, bf16). This
module adds what continual pre-training needs on top, which DeepSpeed does not do uniformly across
its optimizer wrappers: a step whose loss (or gradient norm) is non-finite on any rank is skipped
on every rank, leaving weights, optimizer moments and the learning-rate position untouched.

The learning rate of step ``t`` (0 for the first step of a stage) is ``lr_fn(t)``, set on the
optimizer right before DeepSpeed's step. There is no scheduler object whose position DeepSpeed
would move or not depending on its wrapper, and the lr of every step is the one ``cpt plan``
shows: a skipped step spends its lr without an update.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from cpt import dist
from cpt.config.training import DistributedConfig, OptimizerConfig
from cpt.data.blocks import TokenBatch
from cpt.errors import CptError
from cpt.train.head import ChunkedHead, causal_lm_loss
from cpt.train.loss import IGNORE_INDEX
from cpt.train.ops import CPU_ADAM, SHARED_MEMORY_COMM, load_ops, unlink_shared_memory

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass
class StepResult:
    """One optimizer step. The values stay on the device until read: reading ``loss``,
    ``grad_norm`` or ``group_losses`` costs one host-device synchronisation, so the loop reads
    them on logging steps only.

    ``loss`` is the mean over micro-batches and ranks; ``grad_norm`` the global norm before
    clipping (None when the step was skipped); ``group_losses`` the mean loss of each group's
    predicted tokens (None for a group absent from the batch). ``stop`` is whether any rank was asked to
    stop, agreed in the step's own reduction so that every rank stops after the same step.
    """

    lr: float
    skipped: bool
    stop: bool
    totals: torch.Tensor  # reduced [loss sum, group loss sums, group counts, ...] on the device
    n_losses: int  # micro-batches x ranks that the loss sum adds up
    n_groups: int
    norm: torch.Tensor | float | None = None

    @cached_property
    def _host(self) -> list[float]:
        return self.totals.tolist()

    @property
    def loss(self) -> float:
        return self._host[0] / self.n_losses

    @property
    def grad_norm(self) -> float | None:
        return None if self.skipped or self.norm is None else float(self.norm)

    @property
    def group_losses(self) -> tuple[float | None, ...]:
        n = self.n_groups
        sums, counts = self._host[1 : 1 + n], self._host[1 + n : 1 + 2 * n]
        return tuple(s / c if c else None for s, c in zip(sums, counts))


def accelerator_env(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Choose DeepSpeed's CPU accelerator in ``env`` when there is no GPU (DeepSpeed reads it on import)."""
    if "DS_ACCELERATOR" not in env and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def import_deepspeed():
    """Import DeepSpeed with the right accelerator chosen."""
    accelerator_env(os.environ)
    import deepspeed

    return deepspeed


def current_device() -> torch.device:
    """This process's accelerator (its GPU under NCCL), where collectives must place their tensors."""
    return torch.device(import_deepspeed().get_accelerator().current_device_name())


def init_distributed() -> None:
    """Join the process group of a launcher (deepspeed, torchrun, accelerate), or make a group of one."""
    deepspeed = import_deepspeed()
    if torch.distributed.is_initialized():
        return
    atexit.register(_leave_process_group)
    if "WORLD_SIZE" not in os.environ:
        # A lone process: an in-memory store needs no port, so concurrent runs cannot collide.
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it unconditionally
        backend = deepspeed.get_accelerator().communication_backend_name()
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    load_ops(SHARED_MEMORY_COMM)
    deepspeed.init_distributed()
    unlink_shared_memory()


def _leave_process_group() -> None:
    """Destroy the process group while the interpreter is whole: left to interpreter shutdown, gloo's
    worker threads can release tensors after Python is gone and abort the process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#190489)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def ds_config(
    distributed: DistributedConfig, opt: OptimizerConfig, micro_batch_size: int, grad_accum: int,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for a run; the global batch follows from the world size.

    With the model's ``hidden_size`` the ZeRO buckets are sized for it as transformers' DeepSpeed
    integration sizes them: DeepSpeed's defaults (5e8 elements) are buffers of 2 GB in fp32,
    more than a small model's weights.
    """
    zero: dict[str, Any] = {"stage": distributed.zero_stage}
    if hidden_size and distributed.zero_stage > 0:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if distributed.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": distributed.precision == "bf16"},
        # The optimizer is AdamW with a skip switch (below); DeepSpeed's list of known ZeRO
        # optimizers compares exact types, so it must be told that the subclass is fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


@contextmanager
def partitioned_building(config: dict[str, Any]) -> Iterator[bool]:
    """Under ZeRO-3, make transformers build models as partitions (``zero.Init``) and gather them
    where it must (resizing embeddings) while open; yields whether it does. Close it before
    training: transformers would also partition models that must be whole, such as the export's.
    """
    if config["zero_optimization"]["stage"] != 3:
        yield False
        return
    import_deepspeed()
    from transformers.integrations import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(config)  # transformers holds it by a weak reference only
    try:
        with heap_returned_at_once():
            yield True
    finally:
        del alive


@contextmanager
def heap_returned_at_once() -> Iterator[None]:
    """Make glibc serve large host allocations by mmap while open, so that memory freed is returned.

    Building partitions allocates each module's whole weights, keeps a part and frees the rest. By
    default glibc raises its mmap threshold after such frees and carves later blocks from a heap
    that the kept parts fragment, so a rank's resident memory grows towards the whole model that
    it never holds at once. Afterwards the threshold is 32 MiB (glibc's own ceiling) and the heap
    is trimmed. Nothing happens where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        trim_heap()


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc keeps them resident until asked)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


class _Skippable:
    """Optimizer mixin: ``step()`` does nothing while ``skip`` is set.

    DeepSpeed's ZeRO and bf16 wrappers call the inner optimizer's ``step()`` on every rank, after
    reducing and clipping gradients; a no-op there leaves master weights and moments untouched,
    and the wrappers then copy the unchanged master weights back and clear the gradients.
    """

    skip = False

    def step(self, *args, **kwargs):
        if self.skip:
            return None
        return super().step(*args, **kwargs)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _optimizer(model: torch.nn.Module, opt: OptimizerConfig, offload: bool) -> torch.optim.Optimizer:
    groups = [g for g in _param_groups(model, opt.weight_decay) if g["params"]]
    kwargs = {"lr": 0.0, "betas": opt.betas, "eps": opt.eps}  # lr is set before every step
    if offload:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorized Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        load_ops(CPU_ADAM)
        return type("SkippableCPUAdam", (_Skippable, DeepSpeedCPUAdam), {})(groups, adamw_mode=True, **kwargs)
    return type("SkippableAdamW", (_Skippable, torch.optim.AdamW), {})(groups, **kwargs)


class StepEngine:
    """A DeepSpeed engine that takes one optimizer step per :meth:`train_step` call.

    Every rank calls every method (they are collective). ``updates`` counts applied steps and
    ``nonfinite`` skipped ones; both travel with checkpoints through :meth:`state_dict`.
    """

    def __init__(self, engine: DeepSpeedEngine, optimizer: _Skippable, lr_fn: Callable[[int], float], max_nonfinite: int):
        self.engine = engine
        self._optimizer = optimizer
        self.lr_fn = lr_fn
        self.max_nonfinite = max_nonfinite
        self.updates = 0
        self.nonfinite = 0
        self.head = ChunkedHead.of(engine.module)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def rank(self) -> int:
        return self.engine.global_rank

    @property
    def world_size(self) -> int:
        return self.engine.world_size

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    @property
    def precision(self) -> str:
        return "bf16" if self.engine.bfloat16_enabled() else "fp32"

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def close(self) -> None:
        """Let go of the DeepSpeed engine (its hooks, optimizer state and buffers): every rank calls it
        when the stage is over, and :func:`free_memory` then returns the memory."""
        module = self.module
        self.engine.destroy()
        self.engine.optimizer = None
        self._optimizer = None
        if self.zero_stage == 3:
            _forget_zero3_module(module)

    def release_parameters(self) -> None:
        """Give back every parameter that ZeRO-3 gathered or prefetched: forward passes outside a
        training step (evaluation) leave prefetched ones in flight, and a later gather (an export)
        refuses to partition those."""
        if self.zero_stage == 3:
            self.engine.empty_partition_cache()

    def state_dict(self) -> dict[str, int]:
        return {"updates": self.updates, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.updates = int(state["updates"])
        self.nonfinite = int(state["nonfinite"])

    def weights_finite(self) -> bool:
        """Whether every weight is finite, on every rank (collective; ZeRO-3 checks its shards)."""
        local = all(bool(torch.isfinite(local_shard(p)).all()) for p in self.module.parameters())
        return bool(dist.reduce_values([float(local)], self.device, op="min")[0])

    def train_step(
        self, micro_batches: Sequence[torch.Tensor | TokenBatch], step: int, groups: Sequence[torch.Tensor] | None = None,
        n_groups: int = 0, stop: bool = False,
    ) -> StepResult:
        """Forward and backward each micro-batch, then update once with lr ``lr_fn(step)``.

        A micro-batch is a :class:`TokenBatch` (ids, targets, positions) or a ``(micro, seq_len)``
        tensor of token ids whose every next token is a target. Its loss is the mean over its
        targets. ``groups`` (one int tensor per micro-batch, values < ``n_groups``) labels each
        sequence, e.g. with its data domain; the result then carries the mean loss of each
        group's targets over all ranks. ``stop`` is this rank's stop request, agreed over ranks in the
        result. Raises :class:`CptError` once more than ``max_nonfinite`` steps had a
        non-finite loss; the model is then still the last good one.
        """
        engine = self.engine
        if len(micro_batches) != engine.gradient_accumulation_steps():
            raise ValueError(f"expected {engine.gradient_accumulation_steps()} micro-batches, got {len(micro_batches)}")
        # The step's one reduction: [loss sum, group loss sums, group counts, non-finite grad, stop].
        totals = torch.zeros(3 + 2 * n_groups, dtype=torch.float64, device=self.device)
        # Without ZeRO the engine's forward wrapper only adds per-step bookkeeping (it hooks the
        # logits' gradient); the module itself is what runs, and engine.backward still scales
        # for accumulation and reduces across ranks. ZeRO stages need the wrapper.
        forward = engine.module if self.zero_stage == 0 else engine
        for i, micro in enumerate(micro_batches):
            batch = micro if isinstance(micro, TokenBatch) else TokenBatch.plain(micro)
            n_targets = batch.n_targets()  # counted on the host: no device synchronisation
            batch = batch.to(self.device, non_blocking=True)
            loss, per_token = causal_lm_loss(forward, self.head, batch, n_targets)
            if groups is not None:  # one cross-entropy gives both the loss and each group's share of it
                _add_group_losses(totals[1 : 1 + 2 * n_groups], per_token, batch.targets != IGNORE_INDEX,
                                  groups[i].to(self.device, non_blocking=True), n_groups)
            engine.backward(loss)
            totals[0] += loss.detach().double()
            if i < len(micro_batches) - 1:
                engine.step()  # a no-op between accumulation boundaries, but DeepSpeed counts micro-steps
        # DeepSpeed's ZeRO and bf16 wrappers measure the norm (and skip a non-finite one) themselves;
        # on the plain fp32 path the gradients are already all-reduced here, so every rank agrees.
        norm = None if self.zero_stage > 0 or self.precision == "bf16" else _grad_norm(self.module, self.device)
        if norm is not None:
            totals[-2] = (~torch.isfinite(norm)).double()
        totals[-1] = float(stop)
        dist.all_reduce(totals)  # every rank sees the same totals, so every rank takes the same branch
        skip, stopping = torch.stack([~torch.isfinite(totals[0]) | (totals[-2] > 0), totals[-1] > 0]).tolist()
        lr = float(self.lr_fn(step))
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        self._optimizer.skip = skip
        try:
            engine.step()
        finally:
            self._optimizer.skip = False
        result = StepResult(lr, skip, stopping, totals, len(micro_batches) * self.world_size, n_groups, norm)
        if skip or not engine.was_step_applied():
            self.nonfinite += 1
            if self.nonfinite > self.max_nonfinite:
                raise CptError(
                    f"the loss or gradient was non-finite on {self.nonfinite} steps, more than max_nonfinite="
                    f"{self.max_nonfinite}; the last checkpoint holds the last good weights (try a lower lr)",
                    where="train",
                )
            result.skipped = True
            return result
        self.updates += 1
        if norm is None:
            result.norm = engine.get_global_grad_norm()
        return result


def _add_group_losses(out: torch.Tensor, per_token: torch.Tensor, counted: torch.Tensor, groups: torch.Tensor,
                      n: int) -> None:
    """Add each row's summed loss to its group's sum (out[:n]) and its predicted tokens to the group's count (out[n:])."""
    out[:n].index_add_(0, groups, per_token.sum(dim=1).double())
    out[n:].index_add_(0, groups, counted.sum(dim=1).double())


def _grad_norm(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Global L2 norm of the (already all-reduced) gradients, before DeepSpeed clips them (on the device)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def _forget_zero3_module(module: torch.nn.Module) -> None:
    """Drop the references that DeepSpeed's ZeRO-3 keeps in module-level state after ``destroy()``
    (0.19): the model stays on the forward-module stack, and a class-wide ``lru_cache`` on the
    parameter coordinator's release plan keeps every coordinator, and through it the optimizer,
    its flat fp32 partitions and moments. Left there, a stage's whole training state outlives it."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    ours = {id(m) for m in module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    release_plan = vars(PartitionedParameterCoordinator)["_PartitionedParameterCoordinator__params_to_release"]
    for cell in release_plan.__closure__ or ():  # the cache sits under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()  # a memo: the coordinators of live engines recompute theirs


def free_memory() -> None:
    """Collect what closed engines left (DeepSpeed's objects hold reference cycles) and return the
    accelerator's and the C heap's free blocks, so that the next stage starts from the memory the first one did."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def local_shard(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of a weight this rank holds: its ZeRO-3 partition, or the whole weight (ZeRO 0-2)."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


def build_engine(
    model: torch.nn.Module,
    distributed: DistributedConfig,
    opt: OptimizerConfig,
    lr_fn: Callable[[int], float],
    micro_batch_size: int,
    grad_accum: int,
    config: dict[str, Any] | None = None,
) -> StepEngine:
    """Wrap ``model`` in a DeepSpeed engine (AdamW, the run's ZeRO stage and precision).

    Works alone (a process group of one is made) or under any launcher; every rank must pass a
    model with the same weights (seed identically before building it). ``config`` is
    :func:`ds_config`'s (default: without model-sized buckets).
    """
    deepspeed = import_deepspeed()
    init_distributed()
    if distributed.precision == "bf16" and not deepspeed.get_accelerator().is_bf16_supported():
        raise CptError("bf16 is not supported by this accelerator; use precision: fp32", where="distributed.precision")
    optimizer = _optimizer(model, opt, distributed.offload_optimizer)
    # DeepSpeed's mixed-precision wrapper for bf16 without ZeRO steps once with zero gradients to
    # allocate Adam's state; that phantom step would shift Adam's bias correction by one forever.
    optimizer.skip = True
    try:
        config = config or ds_config(distributed, opt, micro_batch_size, grad_accum)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        optimizer.skip = False
    return StepEngine(engine, optimizer, lr_fn, opt.max_nonfinite)
