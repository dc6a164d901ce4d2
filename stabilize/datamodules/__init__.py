"""LightningDataModules: CIFAR-10 in memory with per-image augmentation on the batch's device."""

from stabilize.datamodules.augment import CIFAR10_MEAN, CIFAR10_STD, BatchAugment
from stabilize.datamodules.cifar10 import CIFAR10DataModule

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "BatchAugment", "CIFAR10DataModule"]
