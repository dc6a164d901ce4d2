"""Batching in-memory tensors by indexing: a sampler of whole index batches, a dataset of batches, and a loader
for data that already lives on the accelerator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

Split = tuple[Tensor, Tensor]


def rank_and_epoch(trainer: Any) -> tuple[int, int]:
    """The process rank and the current epoch of a datamodule's Trainer, ``(0, 0)`` without one: what seeds the
    batches a rank draws in an epoch."""
    return (trainer.global_rank, trainer.current_epoch) if trainer is not None else (0, 0)


class _Indices(Dataset[int]):
    """``range(n)`` as a Dataset, the sized source DistributedSampler shards."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class BatchPermutationSampler(DistributedSampler):
    """Yields whole batches of indices (with the epoch), so a batch is produced by one tensor index.

    Each epoch draws a permutation from ``seed + epoch`` (or keeps the order when ``shuffle=False``), shards it
    across ``num_replicas`` processes as `DistributedSampler` does (padding by
    wrapping around) and cuts it into batches. It subclasses ``DistributedSampler`` so that Lightning recognises it
    as already distributed-aware and does not replace it; Lightning calls `set_epoch` every epoch.

    `resume_at` makes the next pass over a given epoch start at a given batch (a run resumed mid-epoch).
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
        super().__init__(_Indices(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.num_indices = num_samples
        self.batch_size = batch_size
        self.drop_last_batch = drop_last
        self.device = device
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batch: int) -> None:
        """Start the next iteration over ``epoch`` at batch ``batch`` (once; other epochs start at 0)."""
        self._resume = (epoch, batch)

    def _indices(self) -> Tensor:
        total = self.num_indices
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
        per_rank = -(-self.num_indices // self.num_replicas)
        return per_rank // self.batch_size if self.drop_last_batch else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        order = self._indices()
        if self.device is not None:
            order = order.to(self.device)  # one copy per epoch, not one per batch
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        for index in range(start, len(self)):
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


class ResumeByDataModule:
    """Lightning's stateful-loader interface, empty on purpose: where a run resumed mid-epoch continues (and the
    augmentation's random state) is the datamodule's checkpointed state, counted as batches reach the model, which
    a loader cannot know (Lightning prefetches a batch ahead). Having the interface tells Lightning the loader is
    resumable."""

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        return None


class ResumableDataLoader(ResumeByDataModule, DataLoader):
    """A DataLoader over index batches that Lightning treats as resumable (see `ResumeByDataModule`)."""


class DeviceBatchLoader(ResumeByDataModule):
    """Iterable of batches of a `TensorBatches` whose tensors already live on the accelerator: no
    DataLoader, no worker and no host-to-device copy. Exposes ``sampler`` so that Lightning sets its epoch, and
    ``batch_sampler = None`` as a DataLoader without one does (Lightning reads it before validation and test)."""

    batch_sampler = None

    def __init__(self, batches: TensorBatches, sampler: BatchPermutationSampler) -> None:
        self.dataset = batches
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Split]:
        for key in self.sampler:
            yield self.dataset[key]
