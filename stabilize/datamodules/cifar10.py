"""CIFAR-10 as uint8 tensors in memory, batched by indexing, augmented per image on the batch's device."""

from __future__ import annotations

import os
import pickle
import urllib.error
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.utils import download_and_extract_archive
from typing_extensions import override

from stabilize.datamodules.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_TRAIN = 50_000
IMAGE_SHAPE = (3, 32, 32)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ENV_DATA_DIR = "STABILIZE_CIFAR10_DIR"

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
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch file ({type(err).__name__}: {err}).") from err
    numel = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != numel:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, {numel}); got {data.dtype} {data.shape}.")
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{path}: labels must be in 0..9; found {labels.min()}..{labels.max()}.")
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


def write_batch_file(path: Path, images: Any, labels: Any, byte_keys: bool = False) -> None:
    """Write one batch file in the ``cifar-10-batches-py`` layout (``data``: (N, 3072) array, ``labels``: list).

    ``byte_keys=True`` writes ``b"data"``-style keys, as the original Python 2 pickles load with
    ``encoding="bytes"``; the default ``str`` keys also load in torchvision (``encoding="latin1"``). Nothing is
    validated, so tests can write malformed files too.
    """
    data = np.asarray(images)
    entry = {"data": data.reshape(len(data), -1), "labels": [int(v) for v in np.asarray(labels).reshape(-1)]}
    if byte_keys:
        entry = {key.encode(): value for key, value in entry.items()}
    with open(path, "wb") as file:
        pickle.dump(entry, file, protocol=2)


def write_cifar10_folder(
    root: Path, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, byte_keys: bool = False
) -> Path:
    """Write uint8 ``(N, 3, 32, 32)`` tensors as ``root/cifar-10-batches-py`` (five training batches, the test
    batch and ``batches.meta``), readable by :class:`CIFAR10DataModule` and torchvision. Returns ``root``."""
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


class BatchPermutationSampler(DistributedSampler):
    """Yields whole batches of indices (with the epoch), so a batch is produced by one tensor index.

    Each epoch draws a permutation from ``seed + epoch`` (or keeps the order when ``shuffle=False``), shards it
    across ``num_replicas`` processes as :class:`~torch.utils.data.DistributedSampler` does (padding by
    wrapping around) and cuts it into batches. It subclasses ``DistributedSampler`` so that Lightning recognises it
    as already distributed-aware and does not replace it; Lightning calls :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.drop_last_batch = drop_last
        self.device = device

    def _indices(self) -> Tensor:
        total = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        if self.num_replicas > 1:
            padded = -(-total // self.num_replicas) * self.num_replicas
            order = torch.cat([order, order[: padded - total]])[self.rank :: self.num_replicas]
        return order

    def __len__(self) -> int:
        per_rank = -(-len(self.dataset) // self.num_replicas)  # type: ignore[arg-type]
        return per_rank // self.batch_size if self.drop_last_batch else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:  # type: ignore[override]
        order = self._indices()
        if self.device is not None:
            order = order.to(self.device)  # one copy per epoch, not one per batch
        for index in range(len(self)):
            yield order[index * self.batch_size : (index + 1) * self.batch_size], self.epoch


class TensorBatches(Dataset):
    """Dataset over in-memory tensors whose items are whole batches: ``batches[(indices, epoch)]``.

    With ``flip_parity`` (a boolean per image), image ``i`` is mirrored in epoch ``e`` exactly when
    ``flip_parity[i] != (e % 2 == 1)``: each image is seen flipped in every other epoch (alternating flip).
    """

    def __init__(self, images: Tensor, labels: Tensor, flip_parity: Tensor | None = None) -> None:
        self.images = images
        self.labels = labels
        self.flip_parity = flip_parity

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[Tensor, int]) -> Split:
        indices, epoch = key
        images = self.images[indices]
        if self.flip_parity is not None:
            flip = self.flip_parity[indices] ^ bool(epoch % 2)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return images, self.labels[indices]


class DeviceBatchLoader:
    """Iterable of batches of a :class:`TensorBatches` whose tensors already live on the accelerator: no
    DataLoader, no worker and no host-to-device copy. Exposes ``sampler`` so that Lightning sets its epoch."""

    def __init__(self, batches: TensorBatches, sampler: BatchPermutationSampler) -> None:
        self.dataset = batches
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Split]:
        for key in self.sampler:
            yield self.dataset[key]


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 held as uint8 tensors, batched by tensor indexing and augmented per image on the batch's device.

    Batches leave the loaders as uint8 ``(N, 3, 32, 32)`` images (a quarter of the bytes of float32 over PCIe)
    and int64 labels. :meth:`on_after_batch_transfer`, which the Trainer calls once the batch is on its device,
    turns them into normalized float32 and, for training batches only, applies random scale, translation, flip
    and cutout with independent parameters per image. Validation, test and predict data are never augmented.

    Args:
        data_dir: Folder holding ``cifar-10-batches-py`` (or that folder itself). Defaults to the environment
            variable ``STABILIZE_CIFAR10_DIR``, else ``./data``.
        batch_size: Images per batch (per process under DDP).
        val_size: Training images held out for validation: a count, or a fraction in ``[0, 1)``; 0 disables
            validation. The split is a seeded permutation, identical for a given ``seed``.
        seed: Seed of the split, the shuffling and the augmentation.
        num_workers: DataLoader workers. A batch is one tensor index into memory, so workers only add
            inter-process copies: 0 (the default) is fastest (see benchmarks/bench_datamodule.py).
        pin_memory: Pin batches in page-locked memory for asynchronous copies to the GPU.
        drop_last: Drop the last incomplete training batch.
        download: Download the official archive (md5-checked) when ``data_dir`` holds no copy.
        normalize: Normalize with the CIFAR-10 channel mean and std; otherwise images are scaled to 0..1.
        augment: Master switch of the training augmentation.
        scale: Zoom range ``(low, high)`` drawn per image; ``null`` disables scaling.
        translate: Largest shift in whole pixels per axis, drawn per image; 0 disables it.
        flip: Random horizontal flip with probability 0.5 per image.
        alternate_flip: Instead of random flips, flip a random half of the images in even epochs and exactly
            the other half in odd epochs (every image is seen both ways every two epochs).
        cutout: Side of a square zeroed at a random place in each image; 0 disables it.
        cache_file: Optional ``.pt`` file holding all tensors: written after the first read, loaded afterwards.
        device: ``"cuda"`` keeps the whole uint8 dataset on the Trainer's GPU (about 180 MB) so no batch crosses
            PCIe; falls back to host memory with a warning when no GPU is present. ``None`` keeps it in host memory.

    Raises:
        ValueError: At construction, for a non-positive batch size, a negative or too large ``val_size``, an
            inverted scale range or other out-of-range arguments.
        FileNotFoundError: At :meth:`setup`, when no copy is found and ``download`` is off.
    """

    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    classes = CLASSES
    num_classes = len(CLASSES)
    dims = IMAGE_SHAPE

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int | float = 5_000,
        seed: int = 42,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        download: bool = False,
        normalize: bool = True,
        augment: bool = True,
        scale: tuple[float, float] | None = (0.9, 1.1),
        translate: int = 4,
        flip: bool = True,
        alternate_flip: bool = False,
        cutout: int = 0,
        cache_file: str | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}.")
        self.num_val = _resolve_val_size(val_size)
        if not 0 <= translate < IMAGE_SHAPE[-1]:
            raise ValueError(f"translate must be in [0, {IMAGE_SHAPE[-1]}) pixels, got {translate}.")
        if not 0 <= cutout <= IMAGE_SHAPE[-1]:
            raise ValueError(f"cutout must be in [0, {IMAGE_SHAPE[-1]}] pixels, got {cutout}.")
        if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be None, 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir or os.environ.get(ENV_DATA_DIR) or "data").expanduser()
        stats = (CIFAR10_MEAN, CIFAR10_STD) if normalize else (None, None)
        random_flip = flip and not alternate_flip
        self.augmentation = BatchAugment(scale, translate, random_flip, cutout, *stats)
        self.batch_size = batch_size
        self.seed = seed
        self._splits: dict[str, TensorBatches] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    # ----------------------------------------------------------------------------------------------------- data
    @override
    def prepare_data(self) -> None:
        if find_batches_folder(self.data_dir) is None and self.hparams.download:
            self._download()

    def _download(self) -> None:
        try:
            download_and_extract_archive(self.url, str(self.data_dir), md5=self.archive_md5, remove_finished=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise RuntimeError(
                f"Could not download CIFAR-10 from {self.url} into {self.data_dir} ({type(err).__name__}: {err})."
                f" {self._fixes()}"
            ) from err

    def _fixes(self) -> str:
        return (
            f"Either point data_dir (--data.data_dir, or ${ENV_DATA_DIR}) at a folder holding {FOLDER}/"
            f" (data_batch_1..5, test_batch), or set download=True (--data.download true) on a machine with"
            f" internet access."
        )

    def load_tensors(self) -> dict[str, Tensor]:
        """All images and labels as tensors, from ``cache_file`` when it exists, else from the pickles."""
        cache = Path(self.hparams.cache_file).expanduser() if self.hparams.cache_file else None
        if cache is not None and cache.is_file():
            tensors = torch.load(cache, weights_only=True)
            _check_cached(tensors, cache)
            return tensors
        folder = find_batches_folder(self.data_dir)
        if folder is None:
            if self.hparams.download:
                self._download()
                folder = find_batches_folder(self.data_dir)
            if folder is None:
                raise FileNotFoundError(
                    f"CIFAR-10 not found: searched {self.data_dir.resolve()} and {(self.data_dir / FOLDER).resolve()}"
                    f" for data_batch_1..5 and test_batch. {self._fixes()}"
                )
        tensors = load_cifar10(folder)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tensors, cache)
        return tensors

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        tensors = self.load_tensors()
        train_x, train_y = tensors["train_x"], tensors["train_y"]
        num_val = self.num_val if isinstance(self.num_val, int) else round(self.num_val * len(train_y))
        if num_val >= len(train_y):
            raise ValueError(f"val_size={self.hparams.val_size} leaves no training images out of {len(train_y)}.")
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:num_val], order[num_val:]
        data_device = self._data_device()
        flip_parity = None
        if self.hparams.augment and self.hparams.flip and self.hparams.alternate_flip:
            generator = torch.Generator().manual_seed(self.seed + 1)
            flip_parity = (torch.rand(len(train_idx), generator=generator) < 0.5).to(data_device)
        self._splits["train"] = TensorBatches(
            train_x[train_idx].to(data_device), train_y[train_idx].to(data_device), flip_parity
        )
        if num_val:
            self._splits["val"] = TensorBatches(train_x[val_idx].to(data_device), train_y[val_idx].to(data_device))
        self._splits["test"] = TensorBatches(tensors["test_x"].to(data_device), tensors["test_y"].to(data_device))

    def _data_device(self) -> torch.device:
        if self.hparams.device is None or torch.device(self.hparams.device).type == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            warnings.warn(
                f"CIFAR10DataModule(device={self.hparams.device!r}): no GPU is available, keeping the data in host"
                " memory and batching it with a DataLoader instead.",
                stacklevel=2,
            )
            return torch.device("cpu")
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            return self.trainer.strategy.root_device
        return torch.device(self.hparams.device)

    def split_sizes(self) -> dict[str, int]:
        """Number of images in each split set up so far."""
        return {name: len(batches) for name, batches in self._splits.items()}

    def _loader(self, split: str, train: bool) -> DataLoader | DeviceBatchLoader:
        if split not in self._splits:
            self.setup()
        batches = self._splits[split]
        trainer = self.trainer
        on_device = batches.images.device.type != "cpu"
        sampler = BatchPermutationSampler(
            len(batches),
            self.batch_size,
            shuffle=train,
            drop_last=train and self.hparams.drop_last,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            device=batches.images.device if on_device else None,
        )
        if on_device:
            return DeviceBatchLoader(batches, sampler)
        workers = self.hparams.num_workers
        return DataLoader(
            batches,
            batch_size=None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader | DeviceBatchLoader:
        return self._loader("train", train=True)

    @override
    def val_dataloader(self) -> DataLoader | DeviceBatchLoader | list[Any]:
        self.setup()
        return self._loader("val", train=False) if "val" in self._splits else []

    @override
    def test_dataloader(self) -> DataLoader | DeviceBatchLoader:
        return self._loader("test", train=False)

    @override
    def predict_dataloader(self) -> DataLoader | DeviceBatchLoader:
        return self._loader("test", train=False)

    # ------------------------------------------------------------------------------------------- augmentation
    def generator(self, device: torch.device) -> torch.Generator:
        """The augmentation's random generator on ``device``, seeded from ``seed`` and the process rank."""
        if device not in self._generators:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + 7919 * (rank + 1))
        return self._generators[device]

    def transform_images(self, images: Tensor, train: bool) -> Tensor:
        """uint8 images to normalized float32, augmented per image when ``train`` (and ``augment``) is set.

        Anything that is not a uint8 tensor (e.g. an already normalized float batch, or the model's
        ``example_input_array`` that Lightning passes through this hook) is returned unchanged.
        """
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            return images
        if train and self.hparams.augment and not self.augmentation.is_identity:
            return self.augmentation(images, self.generator(images.device))
        return self.augmentation.normalize(images)

    def transform_batch(self, batch: Any, train: bool) -> Any:
        """Apply :meth:`transform_images` to an ``(images, labels)`` batch or a bare image tensor."""
        if isinstance(batch, (tuple, list)) and batch:
            return (self.transform_images(batch[0], train), *batch[1:])
        return self.transform_images(batch, train)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(batch, train=training)


def _resolve_val_size(val_size: int | float) -> int | float:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be a count or a fraction, got {val_size!r}.")
    if val_size < 0:
        raise ValueError(f"val_size must be non-negative, got {val_size}.")
    if isinstance(val_size, float) and not val_size.is_integer() and val_size >= 1:
        raise ValueError(f"val_size must be a whole count or a fraction below 1, got {val_size}.")
    if val_size >= NUM_TRAIN:
        raise ValueError(f"val_size={val_size} is not smaller than the {NUM_TRAIN} CIFAR-10 training images.")
    return int(val_size) if val_size >= 1 else val_size


def _check_cached(tensors: dict[str, Tensor], path: Path) -> None:
    for split in ("train", "test"):
        x, y = tensors.get(f"{split}_x"), tensors.get(f"{split}_y")
        if x is None or y is None or x.dtype != torch.uint8 or x.shape[1:] != IMAGE_SHAPE or len(x) != len(y):
            raise ValueError(f"{path}: not a CIFAR-10 cache written by CIFAR10DataModule (bad '{split}' tensors).")
