"""The callbacks the doctor's remedies are made of: LearningRateScale, Reinitialize, SwapActivations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stabilize.callbacks import LearningRateScale, Reinitialize, SwapActivations
from stabilize.callbacks.reinitialize import auto_scheme
from stabilize.errors import ConfigurationError


class OneWeight(LightningModule):
    """loss = w * x with x = 1: every SGD step moves w by exactly -lr, so w's path is the learning rates' sum."""

    def __init__(self, schedule: str = "step") -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.schedule = schedule

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.w * 1.0

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD([self.w], lr=1.0)
        scheduler: Any = (
            torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)  # updates from the current LR
            if self.schedule == "step"
            else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(module: LightningModule, steps: int, callbacks: list, tmp_path: Path) -> Trainer:
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("schedule", ["step", "lambda"])
@pytest.mark.parametrize(("factor", "warmup"), [(0.1, 0), (1.0, 4), (0.5, 3)])
def test_learning_rate_scale_multiplies_the_schedule_s_own_rates(
    tmp_path: Path, schedule: str, factor: float, warmup: int
) -> None:
    steps = 9
    module = OneWeight(schedule)
    trainer = fit(module, steps, [LearningRateScale(factor, warmup)], tmp_path)
    own = [0.5 ** (s // 2) if schedule == "step" else 1.0 / (s + 1) for s in range(steps)]
    scaled = [lr * factor * (min(1.0, (s + 1) / warmup) if warmup else 1.0) for s, lr in enumerate(own)]
    # float64 sums of nine terms: exact to rounding.
    assert module.w.item() == pytest.approx(-sum(scaled), rel=1e-12)
    # The schedule kept its own rate (the factor is on only during step()): StepLR's next rate after 9 steps.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.5 ** (steps // 2) if schedule == "step" else 1.0 / (steps + 1), rel=1e-12
    )


@pytest.mark.parametrize("bad", [{"factor": 0.0}, {"factor": math.inf}, {"warmup_steps": -1}])
def test_learning_rate_scale_refuses_bad_arguments(bad: dict) -> None:
    with pytest.raises(ConfigurationError):
        LearningRateScale(**bad)


class Layers(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256, bias=True), nn.Sigmoid())
        self.frozen = nn.Linear(256, 256).requires_grad_(False)
        self.rnn = nn.LSTM(8, 16)
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                layer.weight.normal_(0, 5.0)
                layer.bias.fill_(-10.0)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[0]).sum() + self.frozen(batch[0]).sum() * 0

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)


def test_reinitialize_gives_standard_scales_zero_biases_orthogonal_recurrence(tmp_path: Path) -> None:
    module = Layers()
    frozen = module.frozen.weight.clone()
    callback = Reinitialize("he", seed=3)
    state = torch.random.get_rng_state()
    callback.setup(Trainer(logger=False), module, "fit")
    assert torch.equal(torch.random.get_rng_state(), state)  # its own generator: data order and dropout unchanged
    for layer in (module.net[0], module.net[2]):
        # He: std sqrt(2 / 256) = 0.0884; 65,536 draws estimate it within 1% (relative error ~ 1 / sqrt(2n) = 0.3%).
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.01)
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.equal(module.frozen.weight, frozen)
    for block in module.rnn.weight_hh_l0.split(16):
        assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    assert callback.layers == ["net.0", "net.2", "rnn"]


def test_reinitialize_auto_reads_the_activations() -> None:
    assert auto_scheme(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == "he"
    assert auto_scheme(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) == "xavier"
    assert auto_scheme(nn.Sequential(nn.Linear(2, 2), nn.SELU())) == "lecun"
    assert auto_scheme(nn.Sequential(nn.Linear(2, 2))) == "xavier"
    with pytest.raises(ConfigurationError):
        Reinitialize("glorot")  # type: ignore[arg-type]


def test_swap_activations_replaces_saturating_modules() -> None:
    module = Layers()
    callback = SwapActivations("relu")
    callback.setup(Trainer(logger=False), module, "fit")
    assert callback.swapped == ["net.3"] and isinstance(module.net[3], nn.ReLU)
    kept = Layers()
    SwapActivations("gelu", skip_last=True).setup(Trainer(logger=False), kept, "fit")
    assert isinstance(kept.net[3], nn.Sigmoid)
    with pytest.warns(UserWarning, match="no Sigmoid/Tanh module"):
        SwapActivations().setup(Trainer(logger=False), OneWeight(), "fit")
