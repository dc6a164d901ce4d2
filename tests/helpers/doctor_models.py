"""Small runs whose failure and cure are known, for the doctor's tests (seconds each on a CPU)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from stabilize.doctor import Variant


def teacher(n: int = 2048, seed: int = 0) -> TensorDataset:
    """Inputs and the labels of a fixed random ReLU teacher (4 classes): learnable in ~100 Adam steps."""
    w1 = torch.randn(16, 32, generator=torch.Generator().manual_seed(1234))
    w2 = torch.randn(32, 4, generator=torch.Generator().manual_seed(4321))
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (torch.relu(x @ w1) @ w2).argmax(1))


class TeacherNet(LightningModule):
    """A 4-layer ReLU MLP on the teacher task, with its own dataloader. ``bias=-10`` starts every hidden ReLU dead
    (vanishing: the doctor's re-initialisation cures it); ``bias=0`` is healthy.

    Args:
        bias: Initial bias of the hidden layers.
        lr: Adam's learning rate.
        norm: LayerNorm before every activation (the variant it declares for "normalization").
    """

    def __init__(self, bias: float = 0.0, lr: float = 3e-3, norm: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for i in range(4):
            linear = nn.Linear(16 if i == 0 else 32, 4 if i == 3 else 32)
            layers.append(linear)
            if i < 3:
                nn.init.constant_(linear.bias, bias)
                layers += [nn.LayerNorm(32)] if norm else []
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def stabilize_variants(self) -> dict[str, Variant]:
        return {} if self.hparams["norm"] else {"normalization": Variant("LayerNorm", {"norm": True})}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        self.log("train/accuracy", (logits.argmax(1) == y).float().mean())  # a metric the doctor may judge by
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(teacher(), batch_size=64, shuffle=True, drop_last=True)
