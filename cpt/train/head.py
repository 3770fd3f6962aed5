"""The next-token loss of a causal LM, computed by its output layer chunk by chunk.

A Hugging Face causal LM turns its final hidden states into logits with one output layer
(``lm_head``): (tokens x vocabulary) values, 2 GB in fp32 for one sequence of 4096 tokens at a
128k vocabulary, before their gradient. :class:`ChunkedHead` makes that layer compute the loss
itself, chunk by chunk (:func:`cpt.train.loss.linear_cross_entropy`), while it is armed with the
targets, so no full logits exist. It does this inside the model's own forward call, so the
model's attention and position handling (packed sequences included) and DeepSpeed's hooks (ZeRO-3
gathers the layer's weight for its forward and backward) stay exactly as they are; unarmed, the
layer returns logits as before (generation, harness scoring, export).

Models that transform logits after the output layer (soft-capping, logit scales) would see the
loss instead of logits there: for them :func:`causal_lm_loss` computes fp32 cross-entropy from
the full logits instead.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from cpt.data.blocks import TokenBatch
from cpt.train.loss import IGNORE_INDEX, linear_cross_entropy

log = logging.getLogger(__name__)

# Config fields of architectures whose forward changes the logits after the output layer. Others
# that do are found at their first armed call (the model's output is not what the layer returned).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class ChunkedHead:
    """Installed once on a model's output layer; :meth:`armed` makes its next call return the loss."""

    def __init__(self, model: torch.nn.Module):
        self.layer = model.get_output_embeddings()
        self._plain = self.layer.forward
        self._job: tuple[torch.Tensor, float] | None = None
        self.per_token: torch.Tensor | None = None
        self.returned: torch.Tensor | None = None
        self.active, self.verified = True, False
        self.layer.forward = self._forward

    @classmethod
    def of(cls, model: torch.nn.Module) -> ChunkedHead | None:
        """The head installed on ``model``'s output layer, installed now if need be; None where the
        loss must come from full logits."""
        layer = model.get_output_embeddings()
        if not hasattr(layer, "_cpt_head"):
            layer._cpt_head = cls(model) if cls.supported(model) else None
        head = layer._cpt_head
        return head if head is not None and head.active else None

    @staticmethod
    def supported(model: torch.nn.Module) -> bool:
        layer = model.get_output_embeddings()
        transforms = [name for name in _LOGIT_TRANSFORMS if getattr(model.config, name, None) not in (None, 1, 1.0)]
        if transforms:
            log.info("%s changes its logits after the output layer (%s): the loss is taken from full logits",
                     type(model).__name__, ", ".join(transforms))
        return isinstance(layer, torch.nn.Linear) and not transforms

    @contextmanager
    def armed(self, targets: torch.Tensor, scale: float) -> Iterator[None]:
        self._job, self.per_token, self.returned = (targets, scale), None, None
        try:
            yield
        finally:
            self._job = None

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the loss the layer returned, its per-token losses) of the last armed call, let go of here:
        the loss's graph reaches the model (through ZeRO-3's hooks), which must not outlive its stage."""
        taken, self.returned, self.per_token = (self.returned, self.per_token), None, None
        return taken

    def passed_through(self, out: torch.Tensor, returned: torch.Tensor | None) -> bool:
        """Whether the model returned the loss as the layer made it. Checked by value once (one host
        synchronisation): hooks may wrap the tensor (ZeRO-3's does) without changing it."""
        if not self.verified:
            self.verified = (returned is not None and out.shape == returned.shape
                             and bool(torch.equal(out.detach(), returned.detach())))
        return self.verified

    def remove(self, model: torch.nn.Module) -> None:
        """Give the layer its own forward back, for a model whose forward changes what the layer
        returns (a logit scale or soft-capping that :data:`_LOGIT_TRANSFORMS` does not name)."""
        log.warning("%s changes its output layer's result: the loss is taken from full logits from now on",
                    type(model).__name__)
        self.layer.forward, self.active = self._plain, False

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._job is None:
            return self._plain(hidden)
        targets, scale = self._job
        self._job = None  # one call per arming: a second call (e.g. a tied encoder) gets logits
        loss, per_token = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.layer.weight, targets.reshape(-1), scale, self.layer.bias
        )
        self.per_token, self.returned = per_token.view(targets.shape), loss
        return loss


def _varlen_only_in_one_row(model: torch.nn.Module) -> bool:
    """Whether the model's attention keeps packed documents apart only in a batch of one row:
    transformers' flash-attention path reads packed sequences from position ids at batch size 1."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) == "flash_attention_2"


def causal_lm_loss(
    model: torch.nn.Module, head: ChunkedHead | None, batch: TokenBatch, n_targets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the batch's targets, (rows, seq_len) fp32 per-token losses, 0 where ignored).

    ``model`` is what runs the forward (a DeepSpeed engine or the module); ``head`` the module's
    installed :class:`ChunkedHead`, or None to take the loss from full logits. ``n_targets`` is
    ``batch.n_targets()``, counted on the host before the batch moved to the device.
    """
    if batch.positions is not None and batch.ids.shape[0] > 1 and _varlen_only_in_one_row(model):
        loss, per_token = causal_lm_loss(model, head, batch.as_one_row(), n_targets)
        return loss, per_token.view(batch.targets.shape)
    scale = 1.0 / max(n_targets, 1)
    inputs = {"input_ids": batch.ids, "use_cache": False}
    if batch.positions is not None:
        inputs["position_ids"] = batch.positions
    if head is not None and head.active:
        with head.armed(batch.targets, scale):
            out = model(**inputs).logits
        returned, per_token = head.take()
        if head.passed_through(out, returned):
            return out, per_token
        head.remove(model)  # the model changed the head's output: its loss must come from whole logits
    logits = model(**inputs).logits
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch.targets.shape)
    return per_token.sum() * scale, per_token.detach()
