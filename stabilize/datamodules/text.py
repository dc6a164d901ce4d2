"""CharTextDataModule: character-level language modelling on one text file (tiny Shakespeare by default)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from typing_extensions import override

from stabilize.datamodules.batching import ResumableDataLoader, rank_and_epoch
from stabilize.errors import ConfigurationError, DataError, DataNotFoundError, check_integers

#: The folder of the default text, ``tinyshakespeare.txt``.
ENV_TEXT_DIR = "STABILIZE_TEXT_DIR"
DEFAULT_FILE = "tinyshakespeare.txt"
Batch = tuple[Tensor, Tensor]


class _Windows(IterableDataset):
    """``count`` batches of random windows per epoch. Batch ``k`` of epoch ``e`` on rank ``r`` is drawn from a
    generator seeded by ``(seed, r, e, k)``: a resumed run that skips the batches already consumed draws exactly
    the batches the uninterrupted run drew."""

    def __init__(self, data: CharTextDataModule, count: int) -> None:
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        rank, epoch = rank_and_epoch(self.data.trainer)
        for index in range(self.data.resume_offset(epoch), self.count):
            seed = self.data.hparams["seed"] * 1_000_003 + 7919 * (rank + 1) + 104_729 * epoch + index
            yield self.data.windows("train", self.data.hparams["batch_size"], torch.Generator().manual_seed(seed))


class CharTextDataModule(LightningDataModule):
    """Character-level language modelling: the text's characters are the vocabulary, the first ``train_fraction`` of
    it trains and the rest validates (nanoGPT's ``shakespeare_char`` split), and every training batch is
    ``batch_size`` random windows of ``context + 1`` characters (inputs and next-character targets).

    The text is kept as one integer tensor (on the GPU with ``device="cuda"``, so that a batch is one gather); the
    vocabulary is saved with the checkpoint, and a resumed run continues with the very windows it would have drawn.
    Validation uses a fixed, seeded set of windows of the held-out part.

    Args:
        path: The text file (UTF-8); default ``$STABILIZE_TEXT_DIR/tinyshakespeare.txt``.
        context: Characters a model sees (the window is one longer: the targets are shifted by one).
        batch_size: Windows per batch (per process).
        train_batches: Training batches per epoch.
        val_batches: Validation batches (of fixed windows).
        train_fraction: Share of the text, from its start, that trains.
        seed: Seed of every draw.
        device: ``None`` keeps the text in host memory; ``"cuda"`` puts it on the GPU.

    Raises:
        ConfigurationError: For a size out of range.
        DataNotFoundError: (at setup) When the file is missing.
        DataError: (at setup) When a split is shorter than one window, or a checkpoint's vocabulary differs.

    Example:
        ```python
        data = CharTextDataModule("input.txt", context=64, batch_size=12)
        model = TransformerLM(vocab_size=data.vocab_size, context=64)   # after data.setup()
        ```

    """

    def __init__(
        self,
        path: str | None = None,
        context: int = 64,
        batch_size: int = 12,
        train_batches: int = 200,
        val_batches: int = 20,
        train_fraction: float = 0.9,
        seed: int = 42,
        device: str | None = None,
    ) -> None:
        super().__init__()
        check_integers(1, context=context, batch_size=batch_size, train_batches=train_batches)
        check_integers(0, val_batches=val_batches)
        check_integers(seed=seed)
        if not 0 < train_fraction < 1:
            raise ConfigurationError(f"train_fraction must be in (0, 1), got {train_fraction}.")
        self.save_hyperparameters()
        self.vocabulary: str | None = None
        self._splits: dict[str, Tensor] = {}
        self._position = (0, 0)  # (epoch, training batches consumed in it)
        self._resume: tuple[int, int] | None = None
        self._saved_vocabulary: str | None = None

    @property
    def path(self) -> Path:
        given = self.hparams["path"]
        return Path(given) if given else Path(os.environ.get(ENV_TEXT_DIR, ".")) / DEFAULT_FILE

    @property
    def vocab_size(self) -> int:
        self.setup()
        assert self.vocabulary is not None
        return len(self.vocabulary)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if not self.path.is_file():
            raise DataNotFoundError(
                f"No text at {self.path}: point path (--data.path) at a UTF-8 text file, or ${ENV_TEXT_DIR} at the"
                f" folder holding {DEFAULT_FILE}.",
                searched=f"No text at {self.path}.",
            )
        text = self.path.read_text(encoding="utf-8")
        self.vocabulary = "".join(sorted(set(text)))
        if self._saved_vocabulary is not None and self._saved_vocabulary != self.vocabulary:
            raise DataError(f"{self.path} has another vocabulary than the checkpoint's: is it the same text?")
        lookup = {char: index for index, char in enumerate(self.vocabulary)}
        encoded = torch.tensor([lookup[char] for char in text], dtype=torch.long)
        cut = int(len(encoded) * self.hparams["train_fraction"])
        device = self.hparams["device"]
        for name, part in (("train", encoded[:cut]), ("val", encoded[cut:])):
            if len(part) <= self.hparams["context"] + 1:
                raise DataError(
                    f"The {name} part of {self.path} has {len(part)} characters, fewer than one window of"
                    f" context + 1 = {self.hparams['context'] + 1}."
                )
            self._splits[name] = part.to(device) if device else part

    def windows(self, split: str, count: int, generator: torch.Generator) -> Batch:
        """``count`` random windows of ``split``: inputs ``(count, context)`` and the next characters as targets."""
        data = self._splits[split]
        context = self.hparams["context"]
        starts = torch.randint(0, len(data) - context - 1, (count, 1), generator=generator).to(data.device)
        rows = data[starts + torch.arange(context + 1, device=data.device)]
        return rows[:, :-1], rows[:, 1:]

    def encode(self, text: str) -> Tensor:
        """Character indices of ``text`` (characters of the vocabulary only)."""
        self.setup()
        assert self.vocabulary is not None
        return torch.tensor([self.vocabulary.index(char) for char in text], dtype=torch.long)

    def decode(self, indices: Tensor) -> str:
        """The text of a sequence of character indices."""
        self.setup()
        assert self.vocabulary is not None
        return "".join(self.vocabulary[int(i)] for i in indices.flatten().tolist())

    @override
    def train_dataloader(self) -> DataLoader:
        self.setup()
        return ResumableDataLoader(_Windows(self, self.hparams["train_batches"]), batch_size=None)

    @override
    def val_dataloader(self) -> DataLoader | list[Any]:
        self.setup()
        if not self.hparams["val_batches"]:
            return []
        generator = torch.Generator().manual_seed(self.hparams["seed"] * 1_000_003 + 1)
        size = self.hparams["batch_size"]
        windows = self.windows("val", size * self.hparams["val_batches"], generator)
        return DataLoader(TensorDataset(*windows), batch_size=size)

    # ------------------------------------------------------------------------------------------------- resuming
    def resume_offset(self, epoch: int) -> int:
        """Training batches of ``epoch`` a resumed run already consumed (0 but once, for the epoch it stopped in)."""
        if self._resume is not None and self._resume[0] == epoch:
            offset, self._resume = self._resume[1], None
            return offset
        return 0

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, (tuple, list)) and len(batch) == 2:
            epoch, consumed = self._position
            current = trainer.current_epoch
            self._position = (current, consumed + 1 if epoch == current else 1)
        return batch

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._position[0], "batches_consumed": self._position[1], "vocabulary": self.vocabulary}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
        self._resume = self._position
        self._saved_vocabulary = state_dict.get("vocabulary")
        if self.vocabulary is not None and self._saved_vocabulary not in (None, self.vocabulary):
            raise DataError(f"{self.path} has another vocabulary than the checkpoint's: is it the same text?")
