"""The pathology zoo: small training runs whose gradient health is known by construction, diagnosed by
GradientHealthCallback at its defaults, to measure the verdict's false alarms and misses.

Every case is a model written here (MLPs, a CNN, RNN/LSTM, a small transformer, GANs: not the project's models), a
few hundred optimizer steps on synthetic data, seconds on a CPU. A case's label (healthy, vanishing, exploding,
collapse, stalled) holds by construction, and the run's outcome checks it: a healthy run must learn to the stated
accuracy or loss on held-out data, a failing one must fail (stay near chance, diverge or go non-finite). A case
whose outcome contradicts its label is reported as ``label not borne out`` and left out of the confusion matrix.

The verdict's class is :func:`stabilize.health.verdict_class` of each optimizer's summary, the worst across
optimizers (exploding, then vanishing, collapse, stalled, healthy); non-finite gradients count as exploding.

    python benchmarks/pathology_zoo.py                 # all 42 cases (9 need the zoo extra), ~4 minutes on 2 cores
    python benchmarks/pathology_zoo.py --cadences 1 5 50   # each case at three logging cadences too, ~20 minutes
    python benchmarks/pathology_zoo.py --cases mlp-adam deep-sigmoid
    python benchmarks/pathology_zoo.py --smoke         # five cases, one per label (the test runs this)

Writes ``benchmarks/results/pathology_zoo.json`` (``--out``) and prints each case and the confusion matrix.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import AddingProblemDataModule
from stabilize.doctor import Variant
from stabilize.health import verdict, verdict_class
from stabilize.health.diagnosis import VERDICT_CLASSES
from stabilize.models import RecurrentNet

try:  # run as a script, benchmarks/ is on the path; imported by the tests, the package
    import zoo_foreign
except ImportError:
    from benchmarks import zoo_foreign
against_bar = zoo_foreign.against_bar

LABELS = VERDICT_CLASSES
CLASSES = 4  # chance accuracy 25%
SMOKE_CASES = ("mlp-adam", "deep-sigmoid", "lr-too-high", "transformer-adam-lr-too-high", "minimax-gan", "lr-too-low")


# ------------------------------------------------------------------------------------------------------ data
def teacher_data(n: int, dim: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs and the labels of a fixed random two-layer teacher: learnable, not linearly trivial."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(dim, 32, generator=teacher), torch.randn(32, CLASSES, generator=teacher)
    x = torch.randn(n, dim, generator=generator)
    return x, (torch.relu(x @ w1) @ w2).argmax(1)


def image_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """8x8 images: the class is the quadrant holding a bright blob, under noise."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = torch.randn(n, 1, 8, 8, generator=generator) * 0.5
    for label in range(CLASSES):
        row, col = divmod(label, 2)
        x[y == label, 0, row * 4 + 1 : row * 4 + 3, col * 4 + 1 : col * 4 + 3] += 1.5
    return x, y


def first_token_data(n: int, length: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sequences of random one-hot tokens; the label is the first token (credit must reach t = 0)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CLASSES, (n, length), generator=generator)
    return F.one_hot(tokens, CLASSES).float(), tokens[:, 0]


def regression_data(n: int, outliers: bool, seed: int = 0, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """y = w.x + ``noise``; with ``outliers``, 1 target in 200 is off by a heavy-tailed amount (Cauchy x 10)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 16, generator=generator)
    y = x @ w + noise * torch.randn(n, generator=generator)
    if outliers:
        rows = torch.rand(n, generator=generator) < 1 / 200
        uniform = torch.rand(int(rows.sum()), generator=generator)
        y[rows] += 10 * torch.tan(math.pi * (uniform - 0.5))  # standard Cauchy
    return x, y.unsqueeze(1)


# --------------------------------------------------------------------------------------------------- networks
def mlp(
    depth: int,
    width: int = 64,
    activation: type[nn.Module] = nn.ReLU,
    init_std: float | None = None,
    bias: float = 0.0,
    dim: int = 16,
    out: int = CLASSES,
) -> nn.Sequential:
    """``depth`` linear layers; ``init_std`` replaces PyTorch's default init by N(0, init_std^2)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(dim if i == 0 else width, out if i == depth - 1 else width)
        if init_std is not None:
            nn.init.normal_(linear.weight, std=init_std)
        nn.init.constant_(linear.bias, bias if i < depth - 1 else 0.0)
        layers.append(linear)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def he_mlp(depth: int, width: int = 64) -> nn.Sequential:
    net = mlp(depth, width)
    for module in net:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual blocks: deep, and healthy."""

    def __init__(self, blocks: int = 12, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B A`` with ``B`` zero-initialised (LoRA)."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


class Recurrent(nn.Module):
    """An RNN/LSTM cell unrolled over the sequence, classifying from its last state.

    ``states`` is what GradientHealthCallback's temporal probe reads: a zero ``(N, T, H)`` tensor added to the state
    at every step, so its gradient at ``t`` is the loss's total derivative by ``h_t``, through the recurrence (the
    output sequence of ``nn.RNN`` would only carry the direct gradient, zero before the last step here).
    """

    def __init__(self, cell: str, hidden: int = 64, recurrent_gain: float | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell: nn.Module = (
            nn.LSTMCell(CLASSES, hidden) if cell == "lstm" else nn.RNNCell(CLASSES, hidden, nonlinearity=cell)
        )
        if recurrent_gain is not None:
            with torch.no_grad():
                self.cell.weight_hh.copy_(recurrent_gain * torch.eye(hidden))
                self.cell.bias_hh.zero_()
        self.head = nn.Linear(hidden, CLASSES)
        self.states: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        tap = torch.zeros(n, length, self.hidden, requires_grad=self.training)
        h = c = x.new_zeros(n, self.hidden)
        for t in range(length):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
            h = h + tap[:, t]
        self.states = tap
        return self.head(h)


class TinyTransformer(nn.Module):
    """Pre-LN encoder over the sequence; classifies from the last position (attention must reach t = 0)."""

    def __init__(self, length: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(CLASSES, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x) + self.position)[:, -1])


# ----------------------------------------------------------------------------------------------- LightningModules
class Supervised(LightningModule):
    """Any network, loss and optimizer (``"adam"``, ``"adamw"``, ``"sgd"`` with momentum 0.9, ``"gd"`` without
    momentum);
    ``loss_scale`` multiplies the loss; ``lr_factor(step)`` scales the LR."""

    def __init__(
        self,
        network: nn.Module,
        loss: str = "ce",
        optimizer: str = "adam",
        lr: float = 1e-3,
        loss_scale: float = 1.0,
        lr_factor: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.network, self.loss_kind, self.optimizer_kind = network, loss, optimizer
        self.lr, self.loss_scale, self.lr_factor = lr, loss_scale, lr_factor

    @property
    def recurrent_states(self) -> Tensor | None:
        return getattr(self.network, "states", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.network(x)
        if self.loss_kind == "ce":
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # classes, or tokens (N, T, V)
        else:
            loss = F.mse_loss(out, y)
        return loss * self.loss_scale

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_kind == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        elif self.optimizer_kind == "adamw":
            optimizer = torch.optim.AdamW(params, lr=self.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9 if self.optimizer_kind == "sgd" else 0.0)
        if self.lr_factor is None:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class GAN(LightningModule):
    """A GAN on 2-D points: ``minimax`` (the generator minimises log(1 - D(G(z))), which saturates once the
    discriminator wins) or ``non-saturating`` (maximises log D(G(z)))."""

    def __init__(self, loss: str, lr_generator: float, lr_discriminator: float, discriminator_steps: int) -> None:
        super().__init__()
        self.save_hyperparameters()  # what stabilize doctor rebuilds a variant from
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(
            nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1)
        )
        with torch.no_grad():  # the generator starts far from the data, which the discriminator rejects at once
            self.generator[-1].bias.copy_(torch.tensor([-4.0, 5.0]))
        self.loss, self.discriminator_steps = loss, discriminator_steps
        self.lr_generator, self.lr_discriminator = lr_generator, lr_discriminator

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        optimizer_g, optimizer_d = self.optimizers()  # type: ignore[misc]
        real = batch[0]
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        for _ in range(self.discriminator_steps):
            fake = self.generator(torch.randn(len(real), 2)).detach()
            d_loss = F.binary_cross_entropy_with_logits(
                self.discriminator(real), ones
            ) + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
            optimizer_d.zero_grad()
            self.manual_backward(d_loss)
            optimizer_d.step()
        # What a user of a 2-D GAN would watch (it has no single loss): how far the samples' mean is from the data's,
        # on the batch; the repair bench's doctor judges GAN trials by it (``--doctor.monitor gan/mean_gap``).
        self.log("gan/mean_gap", (fake.mean(0) - real.mean(0)).norm())
        logits = self.discriminator(self.generator(torch.randn(len(real), 2)))
        if self.loss == "minimax":
            g_loss = -F.binary_cross_entropy_with_logits(logits, zeros)  # = log(1 - D(G(z)))
        else:
            g_loss = F.binary_cross_entropy_with_logits(logits, ones)
        optimizer_g.zero_grad()
        self.manual_backward(g_loss)
        optimizer_g.step()

    def stabilize_variants(self) -> dict[str, Variant]:
        """What ``stabilize doctor`` may try (the hook any LightningModule can define)."""
        if self.loss != "minimax":
            return {}
        return {"non_saturating_loss": Variant("the non-saturating generator loss", {"loss": "non-saturating"})}

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.generator.parameters(), lr=self.lr_generator, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr_discriminator, betas=(0.5, 0.999)),
        )


# ------------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One run of the zoo. ``outcome(module)`` returns ``(label borne out, what was measured)``."""

    name: str
    label: str
    why: str
    module: Callable[[], LightningModule]
    #: Training data: a dataset of (input, target) batches drawn in shuffled order, or a datamodule of ours.
    data: Callable[[], TensorDataset | LightningDataModule]
    outcome: Callable[[LightningModule], tuple[bool, str]]
    steps: int = 400
    batch_size: int = 64
    log_every_n_steps: int = 10
    #: The step the failure starts at, by construction (the detection latency is counted from it); None: healthy.
    onset: int | None = None
    #: The library the case needs (the optional ``zoo`` extra); the case is skipped without it.
    needs: str | None = None


def accuracy(data: tuple[Tensor, Tensor], at_least: float | None = None, at_most: float | None = None) -> Any:
    """An outcome check: held-out accuracy at least ``at_least`` (healthy) or at most ``at_most`` (failing)."""

    def check(module: LightningModule) -> tuple[bool, str]:
        x, y = data
        module.eval()
        with torch.no_grad():
            logits = module(x)
        acc = (logits.argmax(1) == y).float().mean().item() if torch.isfinite(logits).all() else math.nan
        if at_least is not None:
            return acc >= at_least, f"held-out accuracy {acc:.1%} (healthy needs >= {at_least:.0%})"
        assert at_most is not None
        ok = not math.isfinite(acc) or acc <= at_most
        return ok, f"held-out accuracy {acc:.1%} (failing needs <= {at_most:.0%} or non-finite; chance 25%)"

    return check


def clean_mse(at_most: float | None = None, at_least: float | None = None) -> Any:
    """An outcome check on clean held-out regression data: MSE at most ``at_most`` (healthy) or at least
    ``at_least`` or non-finite (failing)."""
    x, y = regression_data(2000, outliers=False, seed=7)

    def check(module: LightningModule) -> tuple[bool, str]:
        module.eval()
        with torch.no_grad():
            mse = F.mse_loss(module(x), y).item()
        return against_bar(
            mse, f"clean held-out MSE {mse:.3f} (target variance {y.var().item():.1f}", at_most, at_least
        )

    return check


def adding_mse(at_least: float) -> Any:
    """An outcome check of the adding problem: held-out MSE at least ``at_least`` or non-finite (failing; predicting
    the constant 1.0 scores 0.167)."""

    def check(module: LightningModule) -> tuple[bool, str]:
        data = AddingProblemDataModule(seq_len=100, val_size=0, test_size=1000, seed=7)
        data.setup("test")
        module.eval()
        errors = []
        with torch.no_grad():
            for x, y in data.test_dataloader():
                errors.append(F.mse_loss(module(x).reshape(-1), y.reshape(-1)).item())
        mse = sum(errors) / len(errors)
        return not math.isfinite(
            mse
        ) or mse >= at_least, f"held-out MSE {mse:.3g} (failing needs >= {at_least}; baseline 0.167)"

    return check


def gan_fit(healthy: bool) -> Any:
    def check(module: LightningModule) -> tuple[bool, str]:
        assert isinstance(module, GAN)
        with torch.no_grad():
            fake = module.generator(torch.randn(4000, 2, generator=torch.Generator().manual_seed(3)))
        mean_error = (fake.mean(0) - torch.tensor(GAN_MEAN)).norm().item()
        std = fake.std(0).mean().item()
        # The generator starts 8.5 away; healthy closes the gap to within 2 data standard deviations.
        matched = mean_error < 2 * GAN_STD and 0.5 * GAN_STD < std < 2 * GAN_STD
        words = f"generated mean off by {mean_error:.2f} (started 8.5 off), std {std:.2f} (data: std {GAN_STD})"
        return matched == healthy, words

    return check


GAN_MEAN, GAN_STD = (2.0, -1.0), 0.5


def gan_points(n: int = 8192) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.tensor(GAN_MEAN) + GAN_STD * torch.randn(n, 2, generator=generator))


def dataset(data: tuple[Tensor, Tensor]) -> Callable[[], TensorDataset]:
    return lambda: TensorDataset(*data)


def cases() -> list[Case]:
    teacher, teacher_test = teacher_data(8192), teacher_data(2000, seed=1)
    images, images_test = image_data(4096), image_data(1000, seed=1)
    short, short_test = first_token_data(4096, 12), first_token_data(1000, 12, seed=1)
    long, long_test = first_token_data(4096, 60), first_token_data(1000, 60, seed=1)
    healthy_acc = accuracy(teacher_test, at_least=0.75)
    failing_acc = accuracy(teacher_test, at_most=0.4)

    def lora_model() -> LightningModule:
        torch.manual_seed(5)
        net = he_mlp(4)
        for i, module in enumerate(net):
            if isinstance(module, nn.Linear):
                net[i] = LoRALinear(module)
        head = net[-1]
        assert isinstance(head, LoRALinear)
        head.base.requires_grad_(True)  # the head trains in full, as usual with adapters
        return Supervised(net, lr=3e-3)

    def frozen_backbone() -> LightningModule:
        backbone = he_mlp(4, 256)[:-1].requires_grad_(False)
        return Supervised(nn.Sequential(backbone, nn.Linear(256, CLASSES)), lr=3e-3)

    def spike_then_diverge(step: int) -> float:
        return 1.0 if step < 200 else 300.0

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 100)

    def lr_blip(step: int) -> float:  # three steps at 30x the LR, then back: a loss spike that training recovers from
        return 30.0 if 150 <= step < 153 else 1.0

    return [
        # ---------------------------------------------------------------------------------------- healthy
        Case(
            "mlp-adam",
            "healthy",
            "6-layer ReLU MLP, Adam",
            lambda: Supervised(he_mlp(6)),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "mlp-loss-x1e-3",
            "healthy",
            "the same with the loss multiplied by 1e-3 (Adam is scale-invariant)",
            lambda: Supervised(he_mlp(6), loss_scale=1e-3),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "mlp-loss-x1e3",
            "healthy",
            "the same with the loss multiplied by 1e3 (gradient norms ~1e3-1e4)",
            lambda: Supervised(he_mlp(6), loss_scale=1e3),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "mlp-sgd",
            "healthy",
            "6-layer ReLU MLP, SGD with momentum",
            lambda: Supervised(he_mlp(6), optimizer="sgd", lr=0.05),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "mlp-warmup",
            "healthy",
            "SGD at LR 0.1 after a 100-step linear warm-up",
            lambda: Supervised(he_mlp(6), optimizer="sgd", lr=0.1, lr_factor=warmup),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "tiny-noisy-batches",
            "healthy",
            "batches of 2 examples: every gradient is noisy",
            lambda: Supervised(he_mlp(4), lr=1e-3),
            dataset(teacher),
            accuracy(teacher_test, at_least=0.7),
            steps=800,
            batch_size=2,
        ),
        Case(
            "regression-outliers",
            "healthy",
            "regression whose targets carry rare heavy-tailed outliers (1 in 200)",
            lambda: Supervised(mlp(3, out=1), loss="mse", lr=3e-3),
            lambda: TensorDataset(*regression_data(8192, True)),
            # The outliers pull an MSE fit; a model explaining 90% of the clean variance (27.7) has learned.
            clean_mse(at_most=2.5),
            steps=1500,
            batch_size=32,
        ),
        Case(
            "regression-exact",
            "healthy",
            "noise-free linear regression that converges: every gradient falls toward zero with the loss",
            lambda: Supervised(mlp(1, out=1), loss="mse", optimizer="sgd", lr=0.05),
            lambda: TensorDataset(*regression_data(8192, False, noise=0.0)),
            clean_mse(at_most=0.1),
            steps=600,
        ),
        Case(
            "frozen-backbone",
            "healthy",
            "a frozen random backbone, only the linear head trains",
            frozen_backbone,
            dataset(teacher),
            accuracy(teacher_test, at_least=0.7),
        ),
        Case(
            "lora-adapter",
            "healthy",
            "frozen layers with zero-initialised LoRA adapters (B = 0: A's gradient is 0 at step 0)",
            lora_model,
            dataset(teacher),
            healthy_acc,
            steps=800,
        ),
        Case(
            "residual-mlp-deep",
            "healthy",
            "24 pre-LayerNorm residual layers",
            lambda: Supervised(ResidualMLP()),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "cnn-batchnorm",
            "healthy",
            "2-layer CNN with BatchNorm on 8x8 images",
            lambda: Supervised(SmallCNN(), optimizer="sgd", lr=0.05),
            dataset(images),
            accuracy(images_test, at_least=0.9),
            steps=300,
        ),
        Case(
            "lstm",
            "healthy",
            "LSTM recalling the first of 12 tokens",
            lambda: Supervised(Recurrent("lstm"), lr=1e-2),
            dataset(short),
            accuracy(short_test, at_least=0.9),
            steps=800,
        ),
        Case(
            "transformer",
            "healthy",
            "2-layer pre-LN transformer recalling the first of 12 tokens",
            lambda: Supervised(TinyTransformer(12), lr=3e-3),
            dataset(short),
            accuracy(short_test, at_least=0.9),
            steps=400,
        ),
        Case(
            "gan-minimax-fast-generator",
            "healthy",
            "minimax GAN as below but with a generator as fast as its discriminator: it escapes the early collapse,"
            " its gradient growing 30x from the collapsed level as it does (a recovery, not an explosion)",
            lambda: GAN("minimax", 1e-3, 1e-3, 5),
            gan_points,
            gan_fit(healthy=True),
            steps=3000,
            log_every_n_steps=10,
        ),
        Case(
            "gan-non-saturating",
            "healthy",
            "non-saturating GAN on a 2-D Gaussian, the generator starting far from the data",
            lambda: GAN("non-saturating", 1e-3, 1e-3, 1),
            gan_points,
            gan_fit(healthy=True),
            steps=3000,
            log_every_n_steps=25,
        ),
        Case(
            "lr-blip-recovers",
            "healthy",
            "SGD whose LR jumps 30x for three steps at step 150, then returns: the loss spikes and recovers",
            lambda: Supervised(he_mlp(6), optimizer="sgd", lr=0.01, lr_factor=lr_blip),
            dataset(teacher),
            healthy_acc,
        ),
        Case(
            "mlp-adam-default-cadence",
            "healthy",
            "the healthy Adam MLP logged at the Trainer's default cadence (every 50 steps)",
            lambda: Supervised(he_mlp(6)),
            dataset(teacher),
            healthy_acc,
            log_every_n_steps=50,
        ),
        Case(
            "transformer-adam-lr-too-high",
            "unstable",
            "the healthy 2-layer pre-LN transformer under Adam at LR 0.3 (100x), no warm-up",
            lambda: Supervised(TinyTransformer(12), lr=0.3),
            dataset(short),
            # Its loss ends in the thousands; the arg-max of its huge logits still hits 43% (the healthy run: 100%).
            accuracy(short_test, at_most=0.5),
            steps=300,
            onset=0,
        ),
        *foreign_cases(),
        # -------------------------------------------------------------------------------------- vanishing
        Case(
            "deep-sigmoid",
            "vanishing",
            "20-layer sigmoid MLP, N(0, 0.01^2) init",
            lambda: Supervised(mlp(20, activation=nn.Sigmoid, init_std=0.01), optimizer="sgd", lr=0.05),
            dataset(teacher),
            failing_acc,
            steps=300,
            onset=0,
        ),
        Case(
            "dead-relu",
            "vanishing",
            "ReLU MLP whose hidden biases start at -10: every unit is dead",
            lambda: Supervised(mlp(6, bias=-10.0), lr=1e-3),
            dataset(teacher),
            failing_acc,
            steps=300,
            onset=0,
        ),
        Case(
            "tanh-saturated",
            "vanishing",
            "12-layer tanh MLP whose hidden biases start at 3: every unit saturates (tanh' ~0.01 per layer)",
            lambda: Supervised(mlp(12, activation=nn.Tanh, init_std=0.05, bias=3.0), optimizer="sgd", lr=0.05),
            dataset(teacher),
            failing_acc,
            steps=300,
            onset=0,
        ),
        Case(
            "rnn-through-time",
            "vanishing",
            "tanh RNN recalling the first of 60 tokens (vanishing through time)",
            lambda: Supervised(Recurrent("tanh"), lr=1e-3),
            dataset(long),
            accuracy(long_test, at_most=0.35),
            steps=300,
            onset=0,
        ),
        # -------------------------------------------------------------------------------------- exploding
        Case(
            "big-init",
            "exploding",
            "8-layer ReLU MLP initialised at N(0, 1) (gain ~11 per layer), SGD",
            lambda: Supervised(mlp(8, init_std=1.0), optimizer="sgd", lr=0.01),
            dataset(teacher),
            failing_acc,
            steps=200,
            onset=0,
        ),
        Case(
            "lr-too-high",
            "exploding",
            "6-layer ReLU MLP, SGD at LR 3 (60x too high)",
            lambda: Supervised(he_mlp(6), optimizer="sgd", lr=3.0),
            dataset(teacher),
            failing_acc,
            steps=200,
            onset=0,
        ),
        Case(
            "irnn-gain",
            "exploding",
            "ReLU RNN with recurrent weights 1.2 I over 60 steps (gain > 1)",
            lambda: Supervised(Recurrent("relu", recurrent_gain=1.2), optimizer="sgd", lr=1e-3),
            dataset(long),
            accuracy(long_test, at_most=0.35),
            steps=200,
            onset=0,
        ),
        Case(
            "spike-then-diverge",
            "exploding",
            "SGD trains well for 200 steps, then the LR jumps 300x",
            lambda: Supervised(he_mlp(6), optimizer="sgd", lr=0.01, lr_factor=spike_then_diverge),
            dataset(teacher),
            failing_acc,
            steps=400,
            onset=200,
        ),
        Case(
            "deep-linear-gain",
            "exploding",
            "16-layer MLP with N(0, (2/width)) init and leaky slope 1 (gain 1.4 per layer), SGD",
            lambda: Supervised(mlp(16, activation=nn.Identity, init_std=(2 / 64) ** 0.5), optimizer="sgd", lr=0.01),
            dataset(teacher),
            failing_acc,
            steps=200,
            onset=0,
        ),
        Case(
            "lr-jump",
            "exploding",
            "SGD trains well for 200 steps, then the LR jumps 30x",
            lambda: Supervised(he_mlp(6), optimizer="sgd", lr=0.01, lr_factor=lambda step: 1.0 if step < 200 else 30.0),
            dataset(teacher),
            failing_acc,
            steps=400,
            onset=200,
        ),
        Case(
            "gd-above-stability-limit",
            "exploding",
            "linear regression by plain gradient descent at LR 1.1, above 2 / sharpness (~1 for this MSE): the error"
            " grows geometrically, step after step",
            lambda: Supervised(mlp(1, out=1), loss="mse", optimizer="gd", lr=1.1),
            lambda: TensorDataset(*regression_data(8192, False)),
            clean_mse(at_least=27.0),
            steps=300,
            onset=0,
        ),
        Case(
            "irnn-adding-ours",
            "exploding",
            "this project's RecurrentNet as an IRNN (ReLU, identity recurrence x 1.1) on the adding problem at T = 100,"
            " Adam: the gradient is ~1e4x its loss from the first step and stays there",
            lambda: RecurrentNet(
                input_size=2,
                output_size=1,
                output="regression",
                hidden_size=128,
                cell="rnn_relu",
                init="identity",
                recurrent_gain=1.1,
                optimizer="adam",
                lr=1e-4,
            ),
            lambda: AddingProblemDataModule(seq_len=100, batch_size=50, train_batches=100, val_size=0, test_size=0),
            adding_mse(at_least=0.15),
            steps=100,
            onset=0,
        ),
        # --------------------------------------------------------------------------------------- stalled
        Case(
            "lr-too-low",
            "stalled",
            "the healthy 6-layer MLP under plain gradient descent at LR 1e-5: every step moves the weights by ~1e-5"
            " of their scale, so the loss cannot fall in 400 steps; the gradients themselves are fine",
            lambda: Supervised(he_mlp(6), optimizer="gd", lr=1e-5),
            dataset(teacher),
            failing_acc,
            onset=0,
        ),
        # -------------------------------------------------------------------------------------- collapse
        Case(
            "minimax-gan",
            "collapse",
            "minimax GAN, the generator starting far from the data: the discriminator wins at once (5 steps and 10x"
            " the LR per generator step) and log(1 - D(G(z))) saturates",
            lambda: GAN("minimax", 1e-4, 1e-3, 5),
            gan_points,
            gan_fit(healthy=False),
            steps=3000,
            log_every_n_steps=10,
            onset=0,
        ),
    ]


def foreign_cases() -> list[Case]:
    """The cases on timm, Hugging Face transformers and litgpt models (:mod:`zoo_foreign`)."""
    foreign = zoo_foreign

    text_test = foreign.held_out_text_loss
    images_test = accuracy(foreign.quadrant_images(1000, seed=1), at_least=0.7)
    images_fail = accuracy(foreign.quadrant_images(1000, seed=1), at_most=0.35)

    def warmup_never_ends(step: int) -> float:  # a warm-up over 100,000 steps: the LR stays near 0
        return (step + 1) / 100_000

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 20)

    def case(name: str, label: str, why: str, network: Any, **kwargs: Any) -> Case:
        settings = {"steps": 200, "batch_size": 32, **kwargs}
        module = settings.pop("module")
        text = network in (foreign.hf_gpt2, foreign.litgpt_gpt)
        data = foreign.text_data if text else foreign.image_data
        return Case(name, label, why, module, data, settings.pop("outcome"), needs=foreign.NEEDS[network], **settings)

    return [
        case(
            "timm-vit-adamw-lr-too-high",
            "unstable",
            "timm ViT (4 blocks), AdamW at LR 0.3 without warm-up: the loss rises 8x, falls back to chance",
            foreign.timm_vit,
            module=lambda: Supervised(foreign.timm_vit(), optimizer="adamw", lr=0.3),
            outcome=images_fail,
            onset=0,
        ),
        case(
            "hf-gpt2-adamw-lr-too-high",
            "unstable",
            "Hugging Face GPT-2 (2 layers), AdamW at LR 0.3 without warm-up: the loss rises 4x, falls back to guessing",
            foreign.hf_gpt2,
            module=lambda: Supervised(foreign.hf_gpt2(), optimizer="adamw", lr=0.3),
            outcome=text_test(at_least=3.5),
            onset=0,
        ),
        case(
            "hf-gpt2-warmup-never-ends",
            "stalled",
            "GPT-2 whose warm-up lasts 100,000 steps: the LR stays near 0 for the 200 steps of the run",
            foreign.hf_gpt2,
            module=lambda: Supervised(foreign.hf_gpt2(), optimizer="adamw", lr=1e-3, lr_factor=warmup_never_ends),
            outcome=text_test(at_least=3.5),
            log_every_n_steps=50,
            onset=0,
        ),
        case(
            "hf-gpt2-default-cadence",
            "healthy",
            "GPT-2, AdamW at LR 1e-3, logged at the Trainer's default cadence (every 50 steps)",
            foreign.hf_gpt2,
            module=lambda: Supervised(foreign.hf_gpt2(), optimizer="adamw", lr=1e-3),
            outcome=text_test(at_most=2.0),
            log_every_n_steps=50,
        ),
        case(
            "litgpt-loss-spike-recovers",
            "healthy",
            "litgpt GPT (2 layers), AdamW at LR 0.3 without warm-up: the loss rises 3.5x for ~40 steps, then learns",
            foreign.litgpt_gpt,
            module=lambda: Supervised(foreign.litgpt_gpt(), optimizer="adamw", lr=0.3),
            outcome=text_test(at_most=2.0),
        ),
        case(
            "litgpt-tiny-init",
            "healthy",
            "litgpt GPT with every parameter N(0, 1e-4^2), AdamW: the gradient grows from ~1e-4 as it learns",
            foreign.litgpt_gpt,
            module=lambda: Supervised(foreign.litgpt_gpt(init_std=1e-4), optimizer="adamw", lr=3e-3),
            outcome=text_test(at_most=2.0),
        ),
        case(
            "litgpt-warmup",
            "healthy",
            "litgpt GPT, AdamW at LR 3e-3 after a 20-step warm-up",
            foreign.litgpt_gpt,
            module=lambda: Supervised(foreign.litgpt_gpt(), optimizer="adamw", lr=3e-3, lr_factor=warmup),
            outcome=text_test(at_most=2.0),
        ),
        case(
            "timm-vit-warmup",
            "healthy",
            "timm ViT, AdamW at LR 1e-3 after a 20-step warm-up, logged every 50 steps",
            foreign.timm_vit,
            module=lambda: Supervised(foreign.timm_vit(), optimizer="adamw", lr=1e-3, lr_factor=warmup),
            outcome=images_test,
            steps=300,
            log_every_n_steps=50,
        ),
        case(
            "timm-resnet",
            "healthy",
            "timm ResNet-10t (BatchNorm, residual), SGD at LR 0.05",
            foreign.timm_resnet,
            module=lambda: Supervised(foreign.timm_resnet(), optimizer="sgd", lr=0.05),
            outcome=images_test,
        ),
    ]


# ------------------------------------------------------------------------------------------------------ running
def run_case(case: Case, seed: int = 0, log_every_n_steps: int | None = None) -> dict[str, Any]:
    seed_everything(seed, verbose=False)
    module = case.module()
    health = GradientHealthCallback(verbose=False)
    data = case.data()
    loader: DataLoader | LightningDataModule = (
        data
        if isinstance(data, LightningDataModule)
        else DataLoader(
            data,
            batch_size=case.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    trainer = Trainer(
        max_steps=case.steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=log_every_n_steps or case.log_every_n_steps,
        callbacks=[health],
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(loader, LightningDataModule):
            trainer.fit(module, datamodule=loader)
        else:
            trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    borne_out, outcome = case.outcome(module)
    summaries = health.summary()
    classes = [verdict_class(summary) for summary in summaries.values()]
    worst = next((c for c in ("exploding", "unstable", "vanishing", "collapse", "stalled") if c in classes), "healthy")
    verdicts = {name: verdict(summary) for name, summary in summaries.items()}
    alerts = sorted((a for s in summaries.values() for a in s.get("alerts", [])), key=lambda a: a["step"])
    return {
        "name": case.name,
        "label": case.label,
        "why": case.why,
        "borne_out": borne_out,
        "outcome": outcome,
        "verdict_class": worst,
        "correct": borne_out and worst == case.label,
        "verdicts": verdicts,
        "seconds": round(seconds, 1),
        "steps": case.steps,
        "log_every_n_steps": log_every_n_steps or case.log_every_n_steps,
        "onset": case.onset,
        "alerts": alerts,
        # Evidence the verdict does not use (docs/guide/callback.md says why): the largest per-layer update ratio.
        "largest_update_to_weight": {name: s.get("largest_update_to_weight") for name, s in summaries.items()},
        # Steps from the failure's onset (known by construction) to the first alert; None: no alert (the verdict
        # comes at the end of fit), or a healthy case.
        "alert_latency": alerts[0]["step"] - case.onset if alerts and case.onset is not None else None,
        "diagnosis": health.diagnosis(module),
    }


def confusion(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    matrix = {label: dict.fromkeys(LABELS, 0) for label in LABELS}
    for result in results:
        if result["borne_out"]:
            matrix[result["label"]][result["verdict_class"]] += 1
    return matrix


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        mark = "ok " if r["correct"] else ("LABEL NOT BORNE OUT" if not r["borne_out"] else "WRONG")
        verdicts = " | ".join(f"{k}: {v}" for k, v in r["verdicts"].items())
        print(f"{mark:4} {r['name']:<20} {r['label']:<9} -> {r['verdict_class']:<9} {r['seconds']:5.1f} s  {verdicts}")
        print(f"     {'':<20} outcome: {r['outcome']}")
        if r["alerts"]:
            latency = f", {r['alert_latency']} steps after the onset" if r["alert_latency"] is not None else ""
            print(f"     {'':<20} alert: {r['alerts'][0]['kind']} at step {r['alerts'][0]['step']}{latency}")
        if "class_by_cadence" in r:
            same = "same verdict" if r["same_at_every_cadence"] else "VERDICT DIFFERS"
            print(f"     {'':<20} cadences {r['class_by_cadence']}: {same}")
    matrix = confusion(results)
    print("\nconfusion matrix (rows: label, columns: verdict)")
    print(f"{'':<10}" + "".join(f"{c:>11}" for c in LABELS))
    for label in LABELS:
        print(f"{label:<10}" + "".join(f"{matrix[label][c]:>11}" for c in LABELS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="names of the cases to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help=f"run {', '.join(SMOKE_CASES)} only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cadences",
        nargs="*",
        type=int,
        default=[],
        help="also run every case at these log_every_n_steps and compare the verdicts (e.g. 1 5 50)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default benchmarks/results/pathology_zoo.json;"
        " --smoke and --cases write nothing unless given)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    every = cases()
    wanted = SMOKE_CASES if args.smoke else args.cases
    if wanted:
        unknown = set(wanted) - {case.name for case in every}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; known: {[case.name for case in every]}")
        every = [case for case in every if case.name in wanted]
    missing = [case for case in every if case.needs and importlib.util.find_spec(case.needs) is None]
    if missing:
        print(
            f"skipped {len(missing)} case(s) whose library is not installed ({', '.join(c.name for c in missing)}):"
            " pip install -e '.[zoo]'"
        )
        every = [case for case in every if case not in missing]
    results = []
    for case in every:
        result = run_case(case, args.seed)
        if args.cadences:
            # The same run at other logging cadences: the verdict must not change.
            by_cadence = {str(c): run_case(case, args.seed, c) for c in args.cadences}
            result["verdict_by_cadence"] = {c: r["verdicts"] for c, r in by_cadence.items()}
            result["class_by_cadence"] = {c: r["verdict_class"] for c, r in by_cadence.items()}
            result["latency_by_cadence"] = {c: r["alert_latency"] for c, r in by_cadence.items()}
            result["alerts_by_cadence"] = {c: r["alerts"] for c, r in by_cadence.items()}
            result["same_at_every_cadence"] = all(r["verdicts"] == result["verdicts"] for r in by_cadence.values())
        results.append(result)
    print_table(results)
    out = args.out or (None if wanted else Path(__file__).parent / "results" / "pathology_zoo.json")
    cadences = " --cadences " + " ".join(map(str, args.cadences)) if args.cadences else ""
    payload = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "command": "python benchmarks/pathology_zoo.py" + (f" --seed {args.seed}" if args.seed else "") + cadences,
        "skipped": [case.name for case in missing],
        "confusion": confusion(results),
        "correct": sum(r["correct"] for r in results),
        "borne_out": sum(r["borne_out"] for r in results),
        "false_alarms": sum(
            r["label"] == "healthy" and (r["verdict_class"] != "healthy" or bool(r["alerts"])) for r in results
        ),
        "same_at_every_cadence": sum(r.get("same_at_every_cadence", True) for r in results) if args.cadences else None,
        "cases": results,
    }
    if out is not None:
        out.write_text(json.dumps(payload, indent=1))
    print(json.dumps({"correct": payload["correct"], "borne_out": payload["borne_out"], "cases": len(results)}))


if __name__ == "__main__":
    main()
