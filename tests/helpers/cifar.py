"""Tiny CIFAR-format folders for the tests (the real data is never needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stabilize.testing import random_cifar10_folder, write_batch_file

TINY_TRAIN_PER_BATCH = 40  # 5 batches -> 200 training images
TINY_TEST = 50


def write_cifar_pickle(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """Write one batch file with bytes keys, as the original Python 2 pickles load with encoding="bytes"."""
    write_batch_file(path, images, labels, byte_keys=True)


def make_tiny_cifar(root: Path, seed: int = 0) -> Path:
    """A CIFAR-format folder with 200 train and 50 test random images; returns ``root``."""
    return random_cifar10_folder(root, 5 * TINY_TRAIN_PER_BATCH, TINY_TEST, seed=seed, byte_keys=True)
