"""Load (building them first where needed) the DeepSpeed ops a cpt run uses on the CPU: the
shared-memory collectives of ``init_distributed`` and CPU Adam for optimizer offload."""

import torch

from cpt.config.training import OptimizerConfig
from cpt.train.engine import _optimizer, init_distributed

init_distributed()
_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(), offload=True)
print("loaded")
