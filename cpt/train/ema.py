"""An exponential moving average of the weights, kept beside training.

In continual pre-training the average starts at the stage's starting weights, so it trails the
trained model towards the base model: a cheap brake on forgetting that costs no extra training
(used for language adaptation; REFERENCES §2). Each rank averages only the part of every weight
it holds (its ZeRO-3 partition, or the whole weight), in fp32 whatever the training precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cpt.train.engine import local_shard


def _drop_gathered(params: list[torch.nn.Parameter]) -> None:
    """Make ZeRO-3 forget whole copies it keeps of small weights (persistent ones, or any still
    gathered), so the next forward gathers them again from the partitions just written."""
    gathered = [p for p in params if hasattr(p, "ds_tensor") and p.ds_status.name == "AVAILABLE"]
    if gathered:
        gathered[0].partition(param_list=gathered)


class Ema:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [local_shard(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [local_shard(p).float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Put the average into the model for the duration (evaluation, export), then restore the
        trained weights bit for bit."""
        saved = [local_shard(p).clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow):
                    local_shard(p).copy_(s)
            _drop_gathered(self.params)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    local_shard(p).copy_(s)
            _drop_gathered(self.params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the model {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"ema.{i}"])
