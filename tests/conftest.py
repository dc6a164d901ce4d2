from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

# Under pytest-xdist each worker gets one core; more threads would only fight over the two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY_TRAIN_PER_BATCH = 40  # 5 batches -> 200 training images
TINY_TEST = 50


def write_cifar_pickle(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """Write one batch file in the standard layout: uint8 (N, 3072) data, list-of-int labels, bytes keys."""
    entry = {
        b"batch_label": b"tiny",
        b"data": images.reshape(len(images), -1),
        b"labels": labels,
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as file:
        pickle.dump(entry, file, protocol=2)


def make_tiny_cifar(root: Path, seed: int = 0) -> Path:
    """A CIFAR-format folder with 200 train and 50 test random images; returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for index in range(1, 6):
        images = rng.integers(0, 256, (TINY_TRAIN_PER_BATCH, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, TINY_TRAIN_PER_BATCH)]
        write_cifar_pickle(folder / f"data_batch_{index}", images, labels)
    images = rng.integers(0, 256, (TINY_TEST, 3, 32, 32), dtype=np.uint8)
    write_cifar_pickle(folder / "test_batch", images, [i % 10 for i in range(TINY_TEST)])
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, file, protocol=2)
    return root


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
