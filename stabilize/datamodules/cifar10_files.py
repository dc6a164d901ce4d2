"""Reading the ``cifar-10-batches-py`` layout: a safe unpickler and checks that name the file at fault."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stabilize.datamodules.augment import CIFAR10_MEAN, CIFAR10_STD, to_float
from stabilize.errors import ConfigurationError, DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_TRAIN = 50_000
IMAGE_SHAPE = (3, 32, 32)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

Split = tuple[Tensor, Tensor]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers but refuses every other global, so that a
    hostile "CIFAR-10" file cannot run code when it is read."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 encode bytes
        ("numpy.core.numeric", "_frombuffer"),  # how protocol-5 pickles rebuild arrays
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-10 format")


def _get(entry: dict[Any, Any], key: str) -> Any:
    return entry[key.encode()] if key.encode() in entry else entry[key]


def read_batch_file(path: Path) -> Split:
    """Read one CIFAR-10 pickle (``data``: uint8 (N, 3072), ``labels``: N ints) into uint8 ``(N, 3, 32, 32)``
    images and int64 labels, checking shape, dtype and label range.

    Raises:
        ValueError: Naming ``path`` if the file is truncated, not a CIFAR-10 pickle, or holds bad data.
    """
    try:
        with open(path, "rb") as file:
            entry = _NumpyOnlyUnpickler(file, encoding="bytes").load()
        data = np.asarray(_get(entry, "data"))
        labels = np.asarray(_get(entry, "labels"))
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        OverflowError,
    ) as err:
        raise DataError(f"{path}: not a readable CIFAR-10 batch file ({type(err).__name__}: {err}).") from err
    numel = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != numel:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {numel}); got {data.dtype} {data.shape}.")
    if labels.size and labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers 0..9; got {labels.dtype} values such as {labels.flat[:3]}.")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{path}: labels must be in 0..9; found {labels.min()}..{labels.max()}.")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def find_batches_folder(data_dir: Path) -> Path | None:
    """The folder holding the pickles: ``data_dir`` itself or its ``cifar-10-batches-py`` child."""
    for candidate in (data_dir, data_dir / FOLDER):
        if (candidate / TEST_FILE).is_file() and all((candidate / name).is_file() for name in TRAIN_FILES):
            return candidate
    return None


def load_cifar10(folder: Path) -> dict[str, Tensor]:
    """All of CIFAR-10 from a ``cifar-10-batches-py`` folder as ``train_x, train_y, test_x, test_y`` tensors."""
    train = [read_batch_file(folder / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch_file(folder / TEST_FILE)
    return {
        "train_x": torch.cat([x for x, _ in train]),
        "train_y": torch.cat([y for _, y in train]),
        "test_x": test_x,
        "test_y": test_y,
    }


def standardized_training_images(data_dir: str | Path, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` CIFAR-10 training images as floats standardised per channel (CIFAR-10's mean and std),
    and their labels: the fixed sample of an experiment that needs no datamodule (``examples/edge_of_stability.py``,
    ``benchmarks/bench_sharpness_sample.py``).

    Raises:
        DataError: If ``data_dir`` (or its ``cifar-10-batches-py`` child) holds no CIFAR-10 batch files.
    """
    folder = find_batches_folder(Path(data_dir))
    if folder is None:
        raise DataError(f"No CIFAR-10 in {data_dir}: give the folder that holds {FOLDER} (or its batch files).")
    tensors = load_cifar10(folder)
    return to_float(tensors["train_x"][:count], CIFAR10_MEAN, CIFAR10_STD), tensors["train_y"][:count]


def check_cached_tensors(tensors: dict[str, Any], path: Path) -> None:
    """Refuse a ``cache_file`` that does not hold the tensors CIFAR10DataModule writes."""
    for split in ("train", "test"):
        x, y = tensors.get(f"{split}_x"), tensors.get(f"{split}_y")
        if x is None or y is None or x.dtype != torch.uint8 or x.shape[1:] != IMAGE_SHAPE or len(x) != len(y):
            raise DataError(f"{path}: not a CIFAR-10 cache written by CIFAR10DataModule (bad '{split}' tensors).")
        if y.dtype != torch.int64 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= len(CLASSES))):
            raise DataError(f"{path}: the cached '{split}' labels must be int64 in 0..9; delete the cache to rebuild.")


def check_cache_path(path: Path) -> None:
    """Fail before reading anything when the cache can be neither read nor written."""
    if path.exists() and not path.is_file():
        raise ConfigurationError(f"cache_file {path} is not a file (a folder?): name a .pt file.")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if not path.exists() and (parent is None or not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise ConfigurationError(f"cache_file {path} cannot be created: {parent} is not a writable folder.")
