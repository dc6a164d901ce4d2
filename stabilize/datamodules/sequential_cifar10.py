"""SequentialCIFAR10DataModule: CIFAR-10 images read as sequences, row by row or pixel by pixel."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import override

from stabilize.datamodules.cifar10 import CIFAR10DataModule


class SequentialCIFAR10DataModule(CIFAR10DataModule):
    """`CIFAR10DataModule` whose batches are sequences: each image as 32 steps of 96 features (its rows, the
    three channels side by side) or, with ``pixel_by_pixel``, 1,024 steps of 3 features. Augmentation is off by
    default (a recurrent benchmark, not an image one).

    Args:
        pixel_by_pixel: One step per pixel instead of one per row.
        augment: Augment training images before they become sequences.
        **kwargs: Everything else of `CIFAR10DataModule`.
    """

    def __init__(self, pixel_by_pixel: bool = False, augment: bool = False, **kwargs: Any) -> None:
        super().__init__(augment=augment, **kwargs)

    @property
    def sequence_shape(self) -> tuple[int, int]:
        """``(steps, features)`` of one sequence."""
        return (1024, 3) if self.hparams["pixel_by_pixel"] else (32, 96)

    @override
    def transform_images(self, images: Tensor, train: bool) -> Tensor:
        images = super().transform_images(images, train)
        if images.ndim != 4:  # already a sequence (e.g. an example input passed through again)
            return images
        n = len(images)
        if self.hparams["pixel_by_pixel"]:
            return images.permute(0, 2, 3, 1).reshape(n, -1, images.shape[1])
        return images.permute(0, 2, 1, 3).reshape(n, images.shape[2], -1)
