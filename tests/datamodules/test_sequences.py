from __future__ import annotations

import math

import pytest
import torch

from stabilize.datamodules import AddingProblemDataModule, CopyMemoryDataModule, SequentialCIFAR10DataModule


def test_adding_target_is_the_sum_of_the_two_marked_values() -> None:
    task = AddingProblemDataModule(seq_len=50)
    x, y = task.generate(256, torch.Generator().manual_seed(0))
    assert x.shape == (256, 50, 2)
    markers = x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((256,), 2.0))
    assert (markers[:, :25].sum(1) == 1).all() and (markers[:, 25:].sum(1) == 1).all()
    torch.testing.assert_close(y, (x[..., 0] * markers).sum(1))


def test_the_constant_one_predictor_scores_the_documented_baseline() -> None:
    task = AddingProblemDataModule(seq_len=20)
    _, y = task.generate(100_000, torch.Generator().manual_seed(1))
    assert ((y - 1.0) ** 2).mean().item() == pytest.approx(task.baseline_mse, abs=0.005)
    assert task.baseline_mse == pytest.approx(0.167, abs=1e-3) and task.solved_mse == 0.04


def test_copy_memory_layout_and_memoryless_baseline() -> None:
    task = CopyMemoryDataModule(delay=30)
    x, y = task.generate(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 50, 10) and y.shape == (8, 50)
    ids = x.argmax(-1)
    assert torch.equal(y[:, -10:], ids[:, :10]) and (y[:, :-10] == 0).all()
    assert ((ids[:, :10] >= 1) & (ids[:, :10] <= 8)).all()
    assert (ids[:, 39] == 9).all() and (ids[:, 10:39] == 0).all() and (ids[:, 40:] == 0).all()
    assert task.baseline_cross_entropy == pytest.approx(10 * math.log(8) / 50)


def test_validation_set_is_fixed_per_seed_and_training_batches_are_fresh() -> None:
    first, again = AddingProblemDataModule(seq_len=10, val_size=32), AddingProblemDataModule(seq_len=10, val_size=32)
    first.setup()
    again.setup()
    torch.testing.assert_close(next(iter(first.val_dataloader()))[0], next(iter(again.val_dataloader()))[0])
    batches = list(first.train_dataloader())
    assert len(batches) == 100 and not torch.equal(batches[0][0], batches[1][0])


def test_sequential_cifar10_rows_and_pixels(tiny_cifar) -> None:
    rows = SequentialCIFAR10DataModule(data_dir=str(tiny_cifar), val_size=40)
    pixels = SequentialCIFAR10DataModule(data_dir=str(tiny_cifar), val_size=40, pixel_by_pixel=True)
    images = rows.split("test")[0][:2]
    as_rows, as_pixels = rows.transform_images(images, train=False), pixels.transform_images(images, train=False)
    assert as_rows.shape == (2, 32, 96) and as_pixels.shape == (2, 1024, 3)
    plain = rows.augmentation.normalize(images)
    torch.testing.assert_close(as_rows[:, 5, :32], plain[:, 0, 5, :])  # row 5 of the red channel
    torch.testing.assert_close(as_pixels[:, 32 * 5 + 7], plain[:, :, 5, 7])  # pixel (5, 7), its three channels
