"""Synthetic long-range sequence tasks for recurrent nets, generated on the fly from a seed (no files)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from typing_extensions import override

from stabilize.datamodules.batching import rank_and_epoch
from stabilize.errors import ConfigurationError, check_integers

Batch = tuple[Tensor, Tensor]


class _FreshBatches(IterableDataset):
    """``count`` new batches per epoch from a generator seeded by (seed, rank, epoch): every rank draws its own."""

    def __init__(self, task: SequenceTaskDataModule, count: int) -> None:
        self.task, self.count = task, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        rank, epoch = rank_and_epoch(self.task.trainer)
        seed = self.task.hparams["seed"] * 1_000_003 + 7919 * (rank + 1) + 31 * epoch  # distinct per rank and epoch
        generator = torch.Generator().manual_seed(seed)
        for _ in range(self.count):
            yield self.task.generate(self.task.hparams["batch_size"], generator)


class SequenceTaskDataModule(LightningDataModule):
    """Base of the synthetic tasks: training batches drawn fresh every step, fixed validation and test sets per seed
    (identical on every rank; Lightning shards them under DDP).

    Args:
        batch_size: Sequences per training batch (per process).
        train_batches: Training batches per epoch.
        val_size: Validation sequences.
        test_size: Test sequences.
        seed: Seed of every draw.

    Raises:
        ConfigurationError: For a non-positive size.
    """

    #: A base to build on, not one to train: ``stabilize --help`` leaves it out of its list of classes.
    abstract_base = True

    def __init__(
        self,
        batch_size: int = 50,
        train_batches: int = 100,
        val_size: int = 1000,
        test_size: int = 1000,
        seed: int = 42,
    ) -> None:
        super().__init__()
        check_integers(1, batch_size=batch_size, train_batches=train_batches)
        check_integers(0, val_size=val_size, test_size=test_size)
        check_integers(seed=seed)
        self.save_hyperparameters()
        self._fixed: dict[str, Batch] = {}

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` inputs and targets drawn from ``generator``."""
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        if not self._fixed:
            for offset, split in enumerate(("val", "test"), start=1):
                generator = torch.Generator().manual_seed(self.hparams["seed"] * 1_000_003 + offset)
                self._fixed[split] = self.generate(self.hparams[f"{split}_size"], generator)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_FreshBatches(self, self.hparams["train_batches"]), batch_size=None)

    def _fixed_loader(self, split: str) -> DataLoader | list[Any]:
        self.setup()
        x, y = self._fixed[split]
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams["batch_size"]) if len(x) else []

    @override
    def val_dataloader(self) -> DataLoader | list[Any]:
        return self._fixed_loader("val")

    @override
    def test_dataloader(self) -> DataLoader | list[Any]:
        return self._fixed_loader("test")


class AddingProblemDataModule(SequenceTaskDataModule):
    """The adding problem (Hochreiter & Schmidhuber 1997): input ``(N, T, 2)``, channel 0 values from U[0, 1],
    channel 1 a marker that is 1 at one position in the first half and one in the second; the target is the sum of
    the two marked values. Predicting the constant 1.0 scores MSE 1/6 (`baseline_mse`); below 0.04
    (`solved_mse`, Pascanu et al. 2013) the task counts as solved.

    Args:
        seq_len: Sequence length T (at least 2).
        **kwargs: Sizes and seed of `SequenceTaskDataModule`.
    """

    baseline_mse = 1 / 6
    solved_mse = 0.04

    def __init__(self, seq_len: int = 100, **kwargs: Any) -> None:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigurationError(f"seq_len must be an integer of at least 2, got {seq_len!r}.")
        super().__init__(**kwargs)

    @override
    def generate(self, n: int, generator: torch.Generator) -> Batch:
        length = self.hparams["seq_len"]
        values = torch.rand(n, length, generator=generator)
        first = torch.randint(0, length // 2, (n,), generator=generator)
        second = torch.randint(length // 2, length, (n,), generator=generator)
        markers = torch.zeros(n, length)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        return torch.stack([values, markers], dim=-1), values[rows, first] + values[rows, second]


class CopyMemoryDataModule(SequenceTaskDataModule):
    """The copy-memory task (Arjovsky et al. 2016): 10 symbols from 8, ``delay - 1`` blanks, a delimiter, 10 blanks;
    the net must output blanks and then the 10 symbols. Inputs are one-hot ``(N, delay + 20, 10)`` (0 blank, 1-8
    symbols, 9 delimiter), targets class indices ``(N, delay + 20)``. A memoryless net that outputs blanks and then
    guesses scores the cross-entropy ``10 ln 8 / (delay + 20)`` per step (`baseline_cross_entropy`).

    Args:
        delay: Steps between the last symbol and the delimiter, plus one (at least 1).
        **kwargs: Sizes and seed of `SequenceTaskDataModule`.
    """

    num_classes = 10
    symbols = 10

    def __init__(self, delay: int = 100, **kwargs: Any) -> None:
        if not isinstance(delay, int) or delay < 1:
            raise ConfigurationError(f"delay must be a positive integer, got {delay!r}.")
        super().__init__(**kwargs)

    @property
    def baseline_cross_entropy(self) -> float:
        return self.symbols * math.log(8) / (self.hparams["delay"] + 2 * self.symbols)

    @override
    def generate(self, n: int, generator: torch.Generator) -> Batch:
        delay, count = self.hparams["delay"], self.symbols
        length = delay + 2 * count
        symbols = torch.randint(1, 9, (n, count), generator=generator)
        ids = torch.zeros(n, length, dtype=torch.long)
        ids[:, :count] = symbols
        ids[:, count + delay - 1] = 9
        targets = torch.zeros(n, length, dtype=torch.long)
        targets[:, -count:] = symbols
        return torch.nn.functional.one_hot(ids, self.num_classes).float(), targets
