from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.commands import stabilize_command


def fit_args(tiny_cifar: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--model=ResNet",
        "--model.depth=8",
        "--model.scheduler=constant",
        "--data=CIFAR10DataModule",
        f"--data.data_dir={tiny_cifar}",
        "--data.val_size=40",
        "--data.batch_size=16",
        "--trainer.max_steps=12",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        "--trainer.callbacks+=GradientHealthCallback",
        "--trainer.callbacks.log_every_n_steps=2",
        *extra,
    ]


def test_sigterm_writes_a_resumable_checkpoint_prints_the_diagnosis_and_exits_non_zero(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    killed = stabilize_command(
        *fit_args(tiny_cifar, "--trainer.callbacks+=tests.helpers.signals.SignalAtStep", "--trainer.callbacks.step=5"),
        cwd=tmp_path,
    )
    assert killed.returncode == 143, killed.stderr[-2000:]
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.is_file()
    assert "Gradient health, partial: fit stopped by SIGTERMException after 5 optimizer steps" in killed.stderr
    assert f"--ckpt_path {checkpoint}" in killed.stderr + killed.stdout
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 5

    resumed = stabilize_command(
        *fit_args(tiny_cifar, f"--ckpt_path={checkpoint}"), cwd=tmp_path
    )  # same folder, no logger
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "max_steps=12` reached" in resumed.stderr + resumed.stdout
    # The command's defaults (model summary on, which pushes example_input_array through the datamodule's batch
    # hook) resume to exactly the weights of an uninterrupted run: same seed, same batches, same augmentation draws.
    (tmp_path / "reference").mkdir()
    reference = stabilize_command(*fit_args(tiny_cifar), cwd=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    final = "checkpoints/epoch=1-step=12.ckpt"
    expected = torch.load(tmp_path / "reference" / final, weights_only=True)["state_dict"]
    actual = torch.load(tmp_path / final, weights_only=True)["state_dict"]
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_crash_leaves_no_checkpoint_that_looks_resumable(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from stabilize.callbacks import InterruptCheckpoint

    class Crashes(BoringModel):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("a bug")

    trainer = Trainer(default_root_dir=tmp_path, callbacks=[InterruptCheckpoint()], max_steps=2, logger=False)
    with pytest.raises(RuntimeError, match="a bug"):
        trainer.fit(Crashes())
    assert not list(tmp_path.rglob("*.ckpt"))
