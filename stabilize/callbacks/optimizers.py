"""Which of the Trainer's optimizers a hook was called for, and whether its gradients are still scaled there."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision


def optimizer_index(trainer: Trainer, optimizer: torch.optim.Optimizer) -> int:
    """The position of ``optimizer`` (or of the LightningOptimizer wrapping it) in ``trainer.optimizers``."""
    for index, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return index
    return 0


def grad_scaler(trainer: Trainer) -> Any:
    """The fp16 AMP GradScaler of the run, or ``None``."""
    plugin = trainer.precision_plugin
    return plugin.scaler if isinstance(plugin, MixedPrecision) else None


def pending_grad_scaler(trainer: Trainer, optimizer: torch.optim.Optimizer) -> Any:
    """The GradScaler whose scale ``optimizer``'s gradients still carry in ``on_before_optimizer_step``, or ``None``:
    fused optimizers unscale inside ``step()``, after that hook; the others are unscaled before it."""
    scaler = grad_scaler(trainer)
    return scaler if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False) else None


def optimizer_name(module: torch.nn.Module, optimizer: torch.optim.Optimizer, index: int) -> str:
    """A readable name for an optimizer: the direct submodule of ``module`` that holds all of its parameters (e.g.
    ``generator`` and ``discriminator`` of a GAN), else ``optimizer_<index>``."""
    owner = {id(p): name for name, child in module.named_children() for p in child.parameters()}
    owners = {owner.get(id(p)) for group in optimizer.param_groups for p in group["params"]}
    name = owners.pop() if len(owners) == 1 else None
    return name if name is not None else f"optimizer_{index}"
