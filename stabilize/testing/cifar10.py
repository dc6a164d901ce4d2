"""Synthetic data in the formats this library reads, for tests, benchmark smoke runs and the notebook.

These writers validate nothing on purpose, so tests can write malformed files too.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stabilize.datamodules.cifar10_files import CLASSES, FOLDER, IMAGE_SHAPE, META_FILE, TEST_FILE, TRAIN_FILES


def write_batch_file(path: Path, images: Any, labels: Any, byte_keys: bool = False) -> None:
    """Write one batch file in the ``cifar-10-batches-py`` layout (``data``: (N, 3072) array, ``labels``: list).

    ``byte_keys=True`` writes ``b"data"``-style keys, as the original Python 2 pickles load with
    ``encoding="bytes"``; the default ``str`` keys also load in torchvision (``encoding="latin1"``). Nothing is
    validated, so tests can write malformed files too.
    """
    data = np.asarray(images)
    entry: dict[Any, Any] = {
        "data": data.reshape(len(data), -1),
        "labels": [int(v) for v in np.asarray(labels).reshape(-1)],
    }
    if byte_keys:
        entry = {key.encode(): value for key, value in entry.items()}
    with open(path, "wb") as file:
        pickle.dump(entry, file, protocol=2)


def write_cifar10_folder(
    root: Path, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, byte_keys: bool = False
) -> Path:
    """Write uint8 ``(N, 3, 32, 32)`` tensors as ``root/cifar-10-batches-py`` (five training batches, the test
    batch and ``batches.meta``), readable by `CIFAR10DataModule` and torchvision. Returns ``root``."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in zip(TRAIN_FILES, torch.tensor_split(train_x, 5), torch.tensor_split(train_y, 5)):
        write_batch_file(folder / name, x.numpy(), y.numpy(), byte_keys)
    write_batch_file(folder / TEST_FILE, test_x.numpy(), test_y.numpy(), byte_keys)
    meta = {"label_names": list(CLASSES), "num_cases_per_batch": len(train_x) // 5, "num_vis": 3072}
    with open(folder / META_FILE, "wb") as file:
        pickle.dump({k.encode(): v for k, v in meta.items()} if byte_keys else meta, file, protocol=2)
    return Path(root)


def random_cifar10_folder(root: Path, num_train: int, num_test: int, seed: int = 0, byte_keys: bool = False) -> Path:
    """A CIFAR-format folder of uniformly random images and labels (tests, smoke runs of the benchmarks)."""
    generator = torch.Generator().manual_seed(seed)

    def images(n: int) -> Tensor:
        return torch.randint(0, 256, (n, *IMAGE_SHAPE), generator=generator, dtype=torch.uint8)

    def labels(n: int) -> Tensor:
        return torch.randint(0, len(CLASSES), (n,), generator=generator)

    return write_cifar10_folder(
        root, images(num_train), labels(num_train), images(num_test), labels(num_test), byte_keys
    )
