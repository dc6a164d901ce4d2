from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stabilize.datamodules.cifar10 import random_cifar10_folder, write_batch_file

# Under pytest-xdist each worker gets one core; more threads would only fight over the two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY_TRAIN_PER_BATCH = 40  # 5 batches -> 200 training images
TINY_TEST = 50


def write_cifar_pickle(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """Write one batch file with bytes keys, as the original Python 2 pickles load with encoding="bytes"."""
    write_batch_file(path, images, labels, byte_keys=True)


def make_tiny_cifar(root: Path, seed: int = 0) -> Path:
    """A CIFAR-format folder with 200 train and 50 test random images; returns ``root``."""
    return random_cifar10_folder(root, 5 * TINY_TRAIN_PER_BATCH, TINY_TEST, seed=seed, byte_keys=True)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only tiny CIFAR-10 copy shared by the whole session (do not modify)."""
    return make_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture
def tiny_cifar_copy(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 copy a test may damage."""
    return make_tiny_cifar(tmp_path / "data")


@pytest.fixture
def real_cifar_dir() -> Path:
    path = os.environ.get("STABILIZE_CIFAR10_DIR")
    if not path:
        pytest.skip("STABILIZE_CIFAR10_DIR is not set; set it to a real CIFAR-10 copy to run this test")
    return Path(path)
