"""Which of the Trainer's optimizers a hook was called for."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer


def optimizer_index(trainer: Trainer, optimizer: torch.optim.Optimizer) -> int:
    """The position of ``optimizer`` (or of the LightningOptimizer wrapping it) in ``trainer.optimizers``."""
    for index, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return index
    return 0
