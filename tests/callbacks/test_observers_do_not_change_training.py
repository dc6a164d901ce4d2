"""Every observer leaves the training it watches bitwise as it would be without it: dropout masks, the shuffled batch
order and any draw a training step makes from torch's, Python's or NumPy's generators."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from stabilize.callbacks import ForwardStatisticsMonitor, GradientHealthCallback, SharpnessMonitor
from stabilize.datamodules import CharTextDataModule
from stabilize.models import TransformerLM


def noise_from_every_generator() -> float:
    """A factor drawn from torch's, Python's and NumPy's global generators: a step that uses all three."""
    return 1.0 + 0.01 * (float(torch.rand(())) + random.random() + float(np.random.rand()))


class DropoutMLP(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y) * noise_from_every_generator()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(96, 8, generator=generator), torch.randint(0, 3, (96,), generator=generator))
        return DataLoader(data, batch_size=16, shuffle=True)  # reshuffled each epoch from torch's global generator


class NoisyLM(TransformerLM):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * noise_from_every_generator()


def final_state(
    tmp_path: Path,
    make: Callable[[], tuple[LightningModule, object]],
    callbacks: list[Callback],
    logger: Logger | bool = False,
) -> dict:
    seed_everything(0)
    module, data = make()
    Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    ).fit(module, datamodule=data)
    return {
        "weights": {name: value.clone() for name, value in module.state_dict().items()},
        "generators": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def mlp() -> tuple[LightningModule, None]:
    return DropoutMLP(), None


def language_model(tmp_path: Path) -> Callable[[], tuple[LightningModule, object]]:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)

    def make() -> tuple[LightningModule, object]:
        data = CharTextDataModule(str(text), context=8, batch_size=8, train_batches=6, val_batches=1)
        return NoisyLM(vocab_size=30, context=8, depth=2, width=16, heads=2, lr=3e-3), data

    return make


OBSERVERS: dict[str, Callable[[], list[Callback]]] = {
    "gradient_health": lambda: [GradientHealthCallback(log_every_n_steps=2, track_activations=True, verbose=False)],
    "sharpness": lambda: [SharpnessMonitor(every_n_steps=3, iterations=4, verbose=False)],
    "forward_statistics": lambda: [ForwardStatisticsMonitor(log_every_n_steps=2, verbose=False)],
}


#: The run without an observer, per model: the same for every observer, trained once.
baselines: dict[str, dict] = {}


@pytest.mark.parametrize("observer", sorted(OBSERVERS))
@pytest.mark.parametrize("model", ["mlp", "language_model"])
def test_final_weights_and_generators_are_bitwise_those_of_a_run_without_the_observer(
    tmp_path: Path, observer: str, model: str
) -> None:
    if (model, observer) == ("language_model", "sharpness"):
        pytest.skip("the fused CPU attention kernel has no double backward, which a Hessian-vector product needs")
    make = mlp if model == "mlp" else language_model(tmp_path)
    if model not in baselines:
        baselines[model] = final_state(tmp_path, make, [])
    without = baselines[model]
    with_observer = final_state(tmp_path, make, OBSERVERS[observer]())
    assert without["weights"].keys() == with_observer["weights"].keys()
    for name, value in without["weights"].items():
        assert torch.equal(value, with_observer["weights"][name]), name
    torch_state, python_state, numpy_state = with_observer["generators"]
    assert torch.equal(torch_state, without["generators"][0])
    assert python_state == without["generators"][1] and np.array_equal(numpy_state, without["generators"][2])


def test_the_tensorboard_pictures_leave_training_bitwise_as_it_was(tmp_path: Path) -> None:
    # Histograms (plain and log10 magnitudes) and flow figures at every logging step: what runs only with a
    # TensorBoardLogger, which the test above leaves out.
    health = GradientHealthCallback(
        log_every_n_steps=2,
        histogram_every_n_steps=2,
        figure_every_n_steps=2,
        histogram_min_interval_s=0,
        figure_min_interval_s=0,
        verbose=False,
    )
    without = final_state(tmp_path, mlp, [])
    with_pictures = final_state(tmp_path, mlp, [health], TensorBoardLogger(tmp_path, name="tb"))
    for name, value in without["weights"].items():
        assert torch.equal(value, with_pictures["weights"][name]), name
    torch_state, python_state, numpy_state = with_pictures["generators"]
    assert torch.equal(torch_state, without["generators"][0])
    assert python_state == without["generators"][1] and np.array_equal(numpy_state, without["generators"][2])
    (events_file,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    tags = EventAccumulator(str(events_file.parent)).Reload().Tags()
    assert any(t.startswith("grad_log10/") for t in tags["histograms"]) and "grad_health/flow" in tags["images"]
