"""LightningDataModules: CIFAR-10 in memory with per-image augmentation on the batch's device, CIFAR-10 as
sequences, the synthetic long-range tasks for recurrent nets, and character-level text for language models."""

from stabilize.datamodules.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment
from stabilize.datamodules.cifar10 import CIFAR10DataModule
from stabilize.datamodules.sequences import AddingProblemDataModule, CopyMemoryDataModule, SequenceTaskDataModule
from stabilize.datamodules.sequential_cifar10 import SequentialCIFAR10DataModule
from stabilize.datamodules.text import CharTextDataModule

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "AddingProblemDataModule",
    "BatchAugment",
    "CIFAR10DataModule",
    "CharTextDataModule",
    "CopyMemoryDataModule",
    "SequenceTaskDataModule",
    "SequentialCIFAR10DataModule",
]
