"""A run killed mid-epoch and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from stabilize.callbacks import GradientHealthCallback, InterruptCheckpoint
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import ResNet
from tests.helpers.signals import SignalAtStep
from tests.helpers.trainer import quiet_trainer

EPOCHS = 3  # 160 training images / batch 32 = 5 steps per epoch


def fit(tiny_cifar: Path, root: Path, callbacks: list, ckpt_path: Path | None = None) -> ResNet:
    seed_everything(0)
    model = ResNet(depth=8, lr=0.05)
    data = CIFAR10DataModule(str(tiny_cifar), val_size=40, batch_size=32)
    trainer = quiet_trainer(root, max_epochs=EPOCHS, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("kill_at", [2, 8], ids=["inside-epoch-0", "inside-epoch-1"])
def test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(
    kill_at: int, tiny_cifar: Path, tmp_path: Path
) -> None:
    reference = fit(tiny_cifar, tmp_path / "a", [GradientHealthCallback(verbose=False)])
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        fit(tiny_cifar, tmp_path / "b", [InterruptCheckpoint(), SignalAtStep(kill_at, int(signal.SIGTERM))])
    checkpoint = tmp_path / "b" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == kill_at
    with pytest.warns() as caught:
        resumed = fit(tiny_cifar, tmp_path / "b", [GradientHealthCallback(verbose=False)], ckpt_path=checkpoint)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    expected, actual = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:  # BatchNorm running statistics and counters included
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
