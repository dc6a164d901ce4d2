"""Small synthetic image data for model tests: learnable, deterministic, fast."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


def prototype_images(num: int = 256, num_classes: int = 10, size: int = 32, noise: float = 1.0, seed: int = 0):
    """Images = smooth class prototype + Gaussian noise (normalized scale), so a small net can overfit them quickly."""
    generator = torch.Generator().manual_seed(seed)
    # Smooth (4x4 upsampled) prototypes: position-independent colour blobs survive global average pooling.
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(num) % num_classes
    images = prototypes[labels] + noise * torch.randn(num, 3, size, size, generator=generator)
    return images, labels


class SyntheticImages(LightningDataModule):
    def __init__(self, num: int = 256, batch_size: int = 32, size: int = 32, noise: float = 1.0) -> None:
        super().__init__()
        self.images, self.labels = prototype_images(num, size=size, noise=noise)
        self.batch_size = batch_size

    def _loader(self, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=shuffle, generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)
