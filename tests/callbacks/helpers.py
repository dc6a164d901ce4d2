"""Small models and probes for the GradientHealthCallback tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def fixed_data(num: int = 64, features: int = 6, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(num, features, generator=generator), torch.randint(0, 3, (num,), generator=generator)
    )


class TinyMLP(LightningModule):
    """Three linear layers (+ a BatchNorm1d), plain SGD; hooks to plant a huge or NaN loss at a chosen step."""

    def __init__(
        self, lr: float = 0.1, momentum: float = 0.0, loss_scale_at: dict[int, float] | None = None, batch_size: int = 8
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.lr, self.momentum = lr, momentum
        self.loss_scale_at = loss_scale_at or {}
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        scale = self.loss_scale_at.get(self.global_step)
        return loss * scale if scale is not None else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(fixed_data(), batch_size=self.batch_size)


class GradientProbe(Callback):
    """Copies every gradient and weight as the optimizer sees them (runs after GradientHealthCallback)."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.grads[step] = {
            n: p.grad.detach().float().clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }
        self.weights[step] = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}

    def layer_norm(self, step: int, layer: str, source: str = "grads") -> float:
        tensors = [t for n, t in getattr(self, source)[step].items() if n.rsplit(".", 1)[0] == layer]
        return torch.sqrt(sum(t.double().square().sum() for t in tensors)).item()
