"""CIFAR10DataModule: CIFAR-10 as uint8 tensors in memory, batched by indexing, augmented per image on the batch's
device."""

from __future__ import annotations

import os
import urllib.error
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets.utils import download_and_extract_archive
from typing_extensions import override

from stabilize.datamodules.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, PaddingMode
from stabilize.datamodules.batching import (
    BatchPermutationSampler,
    DeviceBatchLoader,
    ResumableDataLoader,
    TensorBatches,
)
from stabilize.datamodules.cifar10_files import (
    CLASSES,
    FOLDER,
    IMAGE_SHAPE,
    NUM_TRAIN,
    check_cache_path,
    check_cached_tensors,
    find_batches_folder,
    load_cifar10,
)
from stabilize.errors import ConfigurationError, DataNotFoundError, check_integers

ENV_DATA_DIR = "STABILIZE_CIFAR10_DIR"
#: Offsets the augmentation seed of each process rank; a prime, so rank seeds never coincide with ``seed + 1``
#: (the alternate-flip draw) or with another run's nearby seeds.
RANK_SEED_STRIDE = 7919


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 held as uint8 tensors, batched by tensor indexing and augmented per image on the batch's device.

    Batches leave the loaders as uint8 ``(N, 3, 32, 32)`` images (a quarter of the bytes of float32 over PCIe)
    and int64 labels. `on_after_batch_transfer`, which the Trainer calls once the batch is on its device,
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
        padding: What a shifted or scaled image shows beyond its border: ``"zeros"`` (black) or ``"reflect"``
            (the image mirrored at its edge, like the speed runs' reflect-padded crops).
        cache_file: Optional ``.pt`` file holding all tensors: written after the first read, loaded afterwards.
        train_subset: Train on this many images only: a seeded, class-balanced subset of the training images left
            after the validation split (quick studies on a CPU). ``None`` uses them all.
        device: ``"cuda"`` keeps the whole uint8 dataset on the Trainer's GPU (about 180 MB) so no batch crosses
            PCIe; falls back to host memory with a warning when no GPU is present. ``None`` keeps it in host memory.

    Raises:
        ValueError: At construction, for a non-positive batch size, a negative or too large ``val_size``, an
            inverted scale range or other out-of-range arguments.
        FileNotFoundError: At `setup`, when no copy is found and ``download`` is off.
    """

    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive_md5 = "c58f30108f718f92721af3b95e74349a"
    classes = CLASSES
    num_classes = len(CLASSES)

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
        padding: PaddingMode = "zeros",
        cache_file: str | None = None,
        device: str | None = None,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        check_integers(1, batch_size=batch_size)
        check_integers(0, num_workers=num_workers)
        check_integers(seed=seed)
        _check_val_size(val_size)
        if train_subset is not None and (not isinstance(train_subset, int) or isinstance(train_subset, bool)):
            raise ConfigurationError(f"train_subset must be a number of images or None, got {train_subset!r}.")
        if train_subset is not None and train_subset < len(CLASSES):
            raise ConfigurationError(f"train_subset must hold at least one image per class, got {train_subset}.")
        if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigurationError(f"device must be None, 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir or os.environ.get(ENV_DATA_DIR) or "data").expanduser()
        stats = (CIFAR10_MEAN, CIFAR10_STD) if normalize else (None, None)
        random_flip = flip and not alternate_flip
        self.augmentation = BatchAugment(
            scale,
            translate,
            random_flip,
            cutout,
            mean=stats[0],
            std=stats[1],
            image_size=IMAGE_SHAPE[-1],
            padding=padding,
        )
        self._splits: dict[str, TensorBatches] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._generator_states: dict[str, Tensor] = {}
        self._position = (0, 0)  # (epoch, training batches consumed in it)
        self._resume_position: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------------------- data
    @override
    def prepare_data(self) -> None:
        if find_batches_folder(self.data_dir) is not None:
            return
        if self.hparams["download"]:
            self._download()
            return
        cache = Path(self.hparams["cache_file"]).expanduser() if self.hparams["cache_file"] else None
        if cache is None or not cache.is_file():
            # Here rather than at setup: the Trainer prepares the data before it creates the logger's run folder,
            # which a missing copy would otherwise leave behind empty.
            raise self._not_found()

    def _download(self) -> None:
        try:
            download_and_extract_archive(self.url, str(self.data_dir), md5=self.archive_md5, remove_finished=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise RuntimeError(
                f"Could not download CIFAR-10 from {self.url} into {self.data_dir} ({type(err).__name__}: {err})."
                f" {self._fixes()}"
            ) from err

    def _not_found(self) -> DataNotFoundError:
        searched = (
            f"CIFAR-10 not found: searched {self.data_dir.resolve()} and {(self.data_dir / FOLDER).resolve()}"
            " for data_batch_1..5 and test_batch."
        )
        return DataNotFoundError(f"{searched} {self._fixes()}", searched=searched)

    def _fixes(self) -> str:
        return (
            f"Either point data_dir (--data.data_dir, or ${ENV_DATA_DIR}) at a folder holding {FOLDER}/"
            f" (data_batch_1..5, test_batch), or set download=True (--data.download true) on a machine with"
            f" internet access."
        )

    def load_tensors(self) -> dict[str, Tensor]:
        """All images and labels as tensors, from ``cache_file`` when it was built from this ``data_dir``, else from
        the pickles (then written to ``cache_file``)."""
        cache = Path(self.hparams["cache_file"]).expanduser() if self.hparams["cache_file"] else None
        folder = find_batches_folder(self.data_dir)
        if cache is not None:
            check_cache_path(cache)
        if cache is not None and cache.is_file():
            tensors = torch.load(cache, weights_only=True)
            check_cached_tensors(tensors, cache)
            source = str(tensors.pop("source", ""))
            candidates = {str(p.resolve()) for p in (self.data_dir, self.data_dir / FOLDER)}
            if source in candidates:
                return tensors
            if folder is None:
                raise DataNotFoundError(
                    f"The cache {cache} was built from {source or 'an unknown folder'}, not from data_dir"
                    f" {self.data_dir.resolve()}, which holds no CIFAR-10 either. Point data_dir at {source or 'the'}"
                    " data the cache came from, or at a CIFAR-10 copy to rebuild it."
                )
            warnings.warn(
                f"Rebuilding the cache {cache}: it was built from {source}, not {folder.resolve()}.", stacklevel=2
            )
        if folder is None:
            if self.hparams["download"]:
                self._download()
                folder = find_batches_folder(self.data_dir)
            if folder is None:
                raise self._not_found()
        tensors = load_cifar10(folder)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({**tensors, "source": str(folder.resolve())}, cache)
        return tensors

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        tensors = self.load_tensors()
        train_x, train_y = tensors["train_x"], tensors["train_y"]
        val_size = self.hparams["val_size"]
        num_val = int(val_size) if val_size >= 1 else round(val_size * len(train_y))
        if num_val >= len(train_y):
            raise ConfigurationError(f"val_size={val_size} leaves no training images out of {len(train_y)}.")
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.hparams["seed"]))
        val_idx, train_idx = order[:num_val], order[num_val:]
        if self.hparams["train_subset"] is not None:
            train_idx = balanced_subset(train_idx, train_y, self.hparams["train_subset"])
        data_device = self._data_device()
        flip_parity = None
        if self.hparams["augment"] and self.hparams["flip"] and self.hparams["alternate_flip"]:
            generator = torch.Generator().manual_seed(self.hparams["seed"] + 1)
            flip_parity = (torch.rand(len(train_idx), generator=generator) < 0.5).to(data_device)
        self._splits["train"] = TensorBatches(
            train_x[train_idx].to(data_device), train_y[train_idx].to(data_device), flip_parity
        )
        if num_val:
            self._splits["val"] = TensorBatches(train_x[val_idx].to(data_device), train_y[val_idx].to(data_device))
        self._splits["test"] = TensorBatches(tensors["test_x"].to(data_device), tensors["test_y"].to(data_device))

    def _data_device(self) -> torch.device:
        if self.hparams["device"] is None or torch.device(self.hparams["device"]).type == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            warnings.warn(
                f"CIFAR10DataModule(device={self.hparams['device']!r}): no GPU is available, keeping the data in host"
                " memory and batching it with a DataLoader instead.",
                stacklevel=2,
            )
            return torch.device("cpu")
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            return self.trainer.strategy.root_device
        return torch.device(self.hparams["device"])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The uint8 images ``(N, 3, 32, 32)`` and int64 labels of split ``"train"``, ``"val"`` or ``"test"``, as
        held in memory (unaugmented, on the data device); sets the data up first if needed."""
        self.setup()
        if name not in self._splits:
            raise ConfigurationError(f"No {name!r} split: the splits are {sorted(self._splits)} (val_size=0 has none).")
        batches = self._splits[name]
        return batches.images, batches.labels

    def split_sizes(self) -> dict[str, int]:
        """Number of images in each split set up so far."""
        return {name: len(batches) for name, batches in self._splits.items()}

    def _loader(self, split: str, train: bool) -> DataLoader | DeviceBatchLoader:
        if split not in self._splits:
            self.setup()
        batches = self._splits[split]
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        batch_size = self.hparams["batch_size"]
        if train and self.hparams["drop_last"] and len(batches) < batch_size * world:
            raise ConfigurationError(
                f"Zero training batches: drop_last=True drops the only, incomplete batch ({len(batches)} training"
                f" images, batch_size={batch_size} x {world} process(es)). Lower batch_size or set drop_last=False."
            )
        on_device = batches.images.device.type != "cpu"
        sampler = BatchPermutationSampler(
            len(batches),
            self.hparams["batch_size"],
            shuffle=train,
            drop_last=train and self.hparams["drop_last"],
            seed=self.hparams["seed"],
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            device=batches.images.device if on_device else None,
        )
        if train and self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        if on_device:
            return DeviceBatchLoader(batches, sampler)
        workers = self.hparams["num_workers"]
        return ResumableDataLoader(
            batches,
            batch_size=None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams["pin_memory"],
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
            seed = self.hparams["seed"] + RANK_SEED_STRIDE * (rank + 1)
            generator = torch.Generator(device=device).manual_seed(seed)
            saved = self._generator_states.pop(str(device), None)
            if saved is not None:
                generator.set_state(saved)
            self._generators[device] = generator
        return self._generators[device]

    def transform_images(self, images: Tensor, train: bool) -> Tensor:
        """uint8 images to normalized float32, augmented per image when ``train`` (and ``augment``) is set.

        Anything that is not a uint8 tensor (e.g. an already normalized float batch, or the model's
        ``example_input_array`` that Lightning passes through this hook) is returned unchanged.
        """
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            return images
        if train and self.hparams["augment"] and not self.augmentation.is_identity:
            return self.augmentation(images, self.generator(images.device))
        return self.augmentation.normalize(images)

    def transform_batch(self, batch: Any, train: bool) -> Any:
        """Apply `transform_images` to an ``(images, labels)`` batch or a bare image tensor."""
        if isinstance(batch, (tuple, list)) and batch:
            return (self.transform_images(batch[0], train), *batch[1:])
        return self.transform_images(batch, train)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        training = trainer is not None and trainer.training
        # Only the training loop's own batches are consumed ones: the model summary pushes example_input_array
        # through this hook too, while trainer.training is already true.
        if trainer is not None and training and _is_loader_batch(batch):
            epoch, consumed = self._position
            current = trainer.current_epoch
            self._position = (current, consumed + 1 if epoch == current else 1)
        return self.transform_batch(batch, train=training)

    # ------------------------------------------------------------------------------------------------- resuming
    @override
    def state_dict(self) -> dict[str, Any]:
        """Where training stands, for an exact mid-epoch resume: the epoch, the training batches that reached the
        model in it, and every process's augmentation random state (gathered from all ranks: Lightning calls this on
        each of them when it saves a checkpoint)."""
        state: dict[str, Any] = {"epoch": self._position[0], "batches_consumed": self._position[1]}
        own = {str(device): generator.get_state() for device, generator in self._generators.items()}
        if self.trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, own)
            state["augmentation_generators_per_rank"] = every
        else:
            state["augmentation_generators"] = own
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
        self._resume_position = self._position
        per_rank = state_dict.get("augmentation_generators_per_rank")
        if per_rank is not None:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            own = per_rank[rank] if rank < len(per_rank) else {}  # more ranks than saved: the new ones start fresh
        else:
            own = state_dict.get("augmentation_generators", {})
        self._generator_states = dict(own)


def _is_loader_batch(batch: Any) -> bool:
    """Whether ``batch`` is one of this datamodule's loader batches: ``(uint8 images, labels)``."""
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], Tensor)
        and batch[0].dtype == torch.uint8
    )


def balanced_subset(indices: Tensor, labels: Tensor, size: int) -> Tensor:
    """``size`` of ``indices`` (already in a seeded random order), as equal a number per class as possible (the
    first classes take the remainder), in their original order."""
    classes = int(labels.max()) + 1
    per_class = [size // classes + (c < size % classes) for c in range(classes)]
    chosen = []
    for c, count in enumerate(per_class):
        of_class = indices[labels[indices] == c]
        if len(of_class) < count:
            raise ConfigurationError(
                f"train_subset={size} needs {count} images of class {c}, but only {len(of_class)} are left after the"
                " validation split."
            )
        chosen.append(of_class[:count])
    keep = torch.zeros(len(labels), dtype=torch.bool)
    keep[torch.cat(chosen)] = True
    return indices[keep[indices]]


def _check_val_size(val_size: int | float) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigurationError(f"val_size must be a count or a fraction, got {val_size!r}.")
    if val_size < 0:
        raise ConfigurationError(f"val_size must be non-negative, got {val_size}.")
    if isinstance(val_size, float) and not val_size.is_integer() and val_size >= 1:
        raise ConfigurationError(f"val_size must be a whole count or a fraction below 1, got {val_size}.")
    if val_size >= NUM_TRAIN:
        raise ConfigurationError(f"val_size={val_size} is not smaller than the {NUM_TRAIN} CIFAR-10 training images.")
