"""The callbacks the doctor's remedies are made of: LearningRateScale, Reinitialize, SwapActivations,
SwapOptimizer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stabilize.callbacks import LearningRateScale, Reinitialize, SwapActivations, SwapOptimizer
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


def fit(module: LightningModule, steps: int, callbacks: list, tmp_path: Path, ckpt_path: Path | None = None) -> Trainer:
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
    trainer.fit(module, data, ckpt_path=ckpt_path)
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


@pytest.mark.parametrize(
    "bad", [{"factor": 0.0}, {"factor": math.inf}, {"warmup_steps": -1}, {"optimizers": []}, {"optimizers": [-1]}]
)
def test_learning_rate_scale_refuses_bad_arguments(bad: dict) -> None:
    with pytest.raises(ConfigurationError):
        LearningRateScale(**bad)


class TwoWeights(LightningModule):
    """Two SGD optimizers (lr 1) stepping one weight each, as a GAN's two networks do: loss = u + v."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.u = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.v = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        for optimizer, weight in zip(self.optimizers(), (self.u, self.v)):  # type: ignore[call-overload]
            optimizer.zero_grad()
            self.manual_backward(weight * 1.0)
            optimizer.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([self.u], lr=1.0), torch.optim.SGD([self.v], lr=1.0)


def test_learning_rate_scale_of_one_optimizer_leaves_the_other_alone(tmp_path: Path) -> None:
    module = TwoWeights()
    fit(module, 8, [LearningRateScale(10.0, optimizers=[0])], tmp_path)  # 8 optimizer steps: 4 of each
    # Each step moves its weight by exactly -lr (float64): u by 4 x 10, v by 4 x 1.
    assert (module.u.item(), module.v.item()) == (-40.0, -4.0)
    with pytest.raises(ConfigurationError, match="no index 2"):
        fit(TwoWeights(), 2, [LearningRateScale(10.0, optimizers=[2])], tmp_path)


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


class TwoGroups(LightningModule):
    """Two weights with loss = a + b (gradient 1 each), an SGD group each at rates 1.0 and 0.5, a StepLR halving."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.a + self.b

    def configure_optimizers(self) -> Any:
        groups = [{"params": [self.a], "lr": 1.0}, {"params": [self.b], "lr": 0.5}]
        optimizer: Any = torch.optim.SGD(groups, momentum=0.9) if self.optimizer == "sgd" else torch.optim.Adam(groups)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_swap_optimizer_trains_with_adamw_at_the_group_ratios_under_the_module_s_schedule(tmp_path: Path) -> None:
    module = TwoGroups()
    trainer = fit(module, 6, [SwapOptimizer("adamw", lr=1e-3)], tmp_path)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and "momentum" not in optimizer.param_groups[0]
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    # A constant gradient of 1 makes every Adam step exactly lr / (1 + eps) long (its moments' ratio is 1), and the
    # SGD group's weight decay (0) carries over: each weight's path is minus the sum of its rates, which StepLR
    # halves every 2 steps, group b at half group a's. Float64: only eps (1e-8 of each step) separates the two.
    rates = [1e-3 * 0.5 ** (step // 2) for step in range(6)]
    assert module.a.item() == pytest.approx(-sum(rates), rel=1e-7)
    assert module.b.item() == pytest.approx(-0.5 * sum(rates), rel=1e-7)


def test_swap_optimizer_leaves_an_adam_alone_and_swaps_the_reverse(tmp_path: Path) -> None:
    trainer = fit(TwoGroups("adam"), 2, [SwapOptimizer("adamw")], tmp_path / "a")
    assert type(trainer.optimizers[0]) is torch.optim.Adam  # Adam is of AdamW's family: nothing to do
    module = TwoGroups("adam")
    trainer = fit(module, 1, [SwapOptimizer("sgd", lr=0.2)], tmp_path / "b")
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and trainer.optimizers[0].defaults["momentum"] == 0.9
    assert (module.a.item(), module.b.item()) == pytest.approx((-0.2, -0.1))  # first step: momentum buffer = grad


def test_swap_optimizer_resumes_with_the_state_of_the_optimizer_it_saved(tmp_path: Path) -> None:
    first = fit(TwoGroups(), 3, [SwapOptimizer("adamw")], tmp_path)
    first.save_checkpoint(tmp_path / "three.ckpt")
    second = fit(TwoGroups(), 6, [SwapOptimizer("adamw")], tmp_path, ckpt_path=tmp_path / "three.ckpt")
    optimizer = second.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["step"].item() == 6  # AdamW's state went on


@pytest.mark.parametrize("bad", [{"to": "lion"}, {"lr": 0.0}, {"lr": float("nan")}])
def test_swap_optimizer_refuses_bad_arguments(bad: dict) -> None:
    with pytest.raises(ConfigurationError):
        SwapOptimizer(**bad)
