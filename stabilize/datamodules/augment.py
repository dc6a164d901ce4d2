"""Per-image random augmentation of whole uint8 batches, as batched tensor operations on any device.

torchvision's v2 transforms draw *one* set of random parameters for a whole batched tensor (torchvision issue
#8484); here every image gets its own scale, shift, flip and cutout. Scale, shift and flip are axis-aligned, so the
bilinear resampling of image ``n`` separates into a row matrix and a column matrix:

```text
out[n, c] = Wy[n] @ img[n, c] @ Wx[n].T        (Wy: H x H, Wx: W x W, one pair per image)
```

Two batched matrix products resample the whole batch, with zero (black) padding where the shifted or shrunken
image leaves the frame, or with the image mirrored at its border (``padding="reflect"``, as the speed runs
crop). With scale 1 the interpolation weights are exactly 0 or 1, so integer shifts and flips move pixels without
blurring them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from stabilize.errors import ConfigurationError, check_integers

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

PaddingMode = Literal["zeros", "reflect"]


@functools.lru_cache(maxsize=32)
def channel_constants(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(1, C, 1, 1)`` tensor of per-channel constants, made once per device: building it from Python floats is a
    host-to-device copy, which would synchronise every training step on a GPU."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def normalize_(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """In place ``(x - mean) / std`` per channel of a float ``(N, C, H, W)`` batch; a no-op when not given."""
    if mean is None or std is None:
        return x
    mean_t = channel_constants(tuple(float(m) for m in mean), x.dtype, x.device)
    std_t = channel_constants(tuple(float(s) for s in std), x.dtype, x.device)
    return x.sub_(mean_t).div_(std_t)


def to_float(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """uint8 ``(N, C, H, W)`` in 0..255 to float32 in 0..1, then per-channel ``(x - mean) / std`` when given."""
    return normalize_(images.float().div_(255.0), mean, std)


def reflect_positions(positions: Tensor, size: int) -> Tensor:
    """Fold positions outside ``[0, size - 1]`` back into the image, mirrored at the border pixel (torch's
    ``"reflect"`` padding: -1 reads 1, ``size`` reads ``size - 2``)."""
    last = size - 1
    return last - (last - positions.abs()).abs()


def resampling_matrices(
    size: int, scale: Tensor, shift: Tensor, flip: Tensor | None = None, reflect: bool = False
) -> Tensor:
    """Bilinear resampling matrices ``(N, size, size)`` for one axis.

    Output pixel ``i`` of image ``n`` reads the input at ``(i' - c) / scale[n] + c - shift[n]`` with
    ``c = (size - 1) / 2`` and ``i' = size - 1 - i`` where ``flip[n]`` (else ``i``): the content is zoomed by
    ``scale`` about the centre, moved by ``shift`` pixels (positive: towards higher indices) and mirrored. Outside
    the image it reads zeros, or with ``reflect`` the image mirrored at its border.
    """
    positions = torch.arange(size, device=scale.device, dtype=scale.dtype)
    out = positions.expand(len(scale), size)
    if flip is not None:
        out = torch.where(flip[:, None], (size - 1) - out, out)
    centre = (size - 1) / 2
    source = (out - centre) / scale[:, None] + centre - shift[:, None]
    if reflect:
        source = reflect_positions(source, size)
    # Tent kernel: weight 1 - |distance| to the two nearest input pixels, 0 beyond (and outside the image).
    return (1.0 - (source[:, :, None] - positions[None, None, :]).abs()).clamp_(min=0.0)


def shift_and_flip(images: Tensor, shift: Tensor, flip: Tensor | None, max_shift: int, reflect: bool = False) -> Tensor:
    """Move image ``n`` by ``shift[:, n]`` whole pixels (rows, columns), zero-filling what enters the frame (or
    mirroring the image there, with ``reflect``), and mirror it where ``flip[n]``: exactly what
    `resampling_matrices` computes at scale 1, by two gathers (from a copy zero-padded by ``max_shift``, at
    least ``shift.abs().max()``; reflection needs no copy, only folded indices)."""
    n, channels, height, width = images.shape
    pad = 0 if reflect else max_shift
    source = images if reflect else torch.nn.functional.pad(images, (pad,) * 4)
    rows = torch.arange(height, device=images.device).expand(n, height) - shift[0][:, None]
    cols = torch.arange(width, device=images.device).expand(n, width)
    if flip is not None:
        cols = torch.where(flip[:, None], (width - 1) - cols, cols)
    cols = cols - shift[1][:, None]
    if reflect:
        rows, cols = reflect_positions(rows, height), reflect_positions(cols, width)
    rows, cols = rows + pad, cols + pad
    out = source.gather(2, rows[:, None, :, None].expand(n, channels, height, source.shape[-1]))
    return out.gather(3, cols[:, None, None, :].expand(n, channels, height, width))


def cutout_mask(n: int, height: int, width: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Boolean ``(N, 1, H, W)`` mask of one ``size x size`` square per image (clipped at the border), centred
    uniformly at random (DeVries & Taylor, 2017)."""
    cy = torch.randint(0, height, (n, 1, 1), generator=generator, device=device)
    cx = torch.randint(0, width, (n, 1, 1), generator=generator, device=device)
    rows = torch.arange(height, device=device).view(1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1)
    top, left = cy - size // 2, cx - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return inside.unsqueeze(1)


class BatchAugment:
    """Random scale, translation, horizontal flip and cutout, drawn independently for every image of a batch.

    Args:
        scale: Zoom range ``(low, high)``; each image is scaled by a factor drawn uniformly from it (>1 zooms in).
            ``None`` disables scaling.
        translate: Largest shift in pixels along each axis; each image moves by an integer drawn uniformly from
            ``[-translate, translate]`` per axis. 0 disables it.
        flip: Mirror each image horizontally with probability 0.5.
        cutout: Side of the square zeroed (after normalization, i.e. set to the mean) in each image; 0 disables.
        mean: Per-channel mean for normalization (of images scaled to 0..1); ``None`` skips normalization.
        std: Per-channel standard deviation for normalization.
        image_size: Side of the images, which bounds ``translate`` (below it) and ``cutout`` (at most it);
            ``None`` accepts any size.
        padding: What scaled or shifted images show beyond their border: ``"zeros"`` (black before
            normalization) or ``"reflect"`` (the image mirrored at its edge, as the speed runs' padded crops).

    Raises:
        ValueError: If a range is inverted, a size negative or beyond ``image_size``, or ``mean``/``std`` bad.
    """

    def __init__(
        self,
        scale: tuple[float, float] | None = (0.9, 1.1),
        translate: int = 4,
        flip: bool = True,
        cutout: int = 0,
        mean: Sequence[float] | None = CIFAR10_MEAN,
        std: Sequence[float] | None = CIFAR10_STD,
        image_size: int | None = None,
        padding: PaddingMode = "zeros",
    ) -> None:
        if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ConfigurationError(f"scale must be (low, high) with 0 < low <= high, got {scale}.")
        check_integers(translate=translate, cutout=cutout)  # their ranges follow
        check_integers(1, image_size=image_size)
        limit = image_size if image_size is not None else float("inf")
        if not 0 <= translate < limit:
            raise ConfigurationError(f"translate must be in [0, {limit}) pixels, got {translate}.")
        if not 0 <= cutout <= limit:
            raise ConfigurationError(f"cutout must be in [0, {limit}] pixels, got {cutout}.")
        if (mean is None) != (std is None):
            raise ConfigurationError("mean and std must both be given or both be None.")
        if std is not None and any(s <= 0 for s in std):
            raise ConfigurationError(f"std must be positive, got {std}.")
        if padding not in get_args(PaddingMode):
            raise ConfigurationError(f"padding must be 'zeros' or 'reflect', got {padding!r}.")
        self.scale = None if scale is None or tuple(scale) == (1.0, 1.0) else (float(scale[0]), float(scale[1]))
        self.translate = int(translate)
        self.flip = flip
        self.cutout = int(cutout)
        self.mean = mean
        self.std = std
        self.reflect = padding == "reflect"

    @property
    def is_identity(self) -> bool:
        return self.scale is None and self.translate == 0 and not self.flip and self.cutout == 0

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 images to normalized float32, without augmentation (validation, test, predict)."""
        return to_float(images, self.mean, self.std)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a uint8 batch ``(N, C, H, W)`` and return it normalized, as float32 on the same device.

        ``generator`` must live on ``images.device``.
        """
        n, _, height, width = images.shape
        device = images.device
        if self.scale is None and (self.translate or self.flip):
            # Integer shifts and mirroring move whole pixels: index a zero-padded uint8 copy instead of resampling.
            shift = torch.randint(-self.translate, self.translate + 1, (2, n), generator=generator, device=device)
            flip = torch.rand(n, generator=generator, device=device) < 0.5 if self.flip else None
            x = shift_and_flip(images, shift, flip, self.translate, self.reflect).float().div_(255.0)
        elif self.scale is not None:
            x = images.float().div_(255.0)
            low, high = self.scale
            scale = torch.rand(n, generator=generator, device=device).mul_(high - low).add_(low)
            shift = torch.randint(-self.translate, self.translate + 1, (2, n), generator=generator, device=device)
            shift = shift.to(x.dtype)
            flip = torch.rand(n, generator=generator, device=device) < 0.5 if self.flip else None
            rows = resampling_matrices(height, scale, shift[0], reflect=self.reflect)
            cols = resampling_matrices(width, scale, shift[1], flip, reflect=self.reflect)
            channels = x.shape[1]
            # Columns first, as one bmm over the (N, C*H, W) view (no copy); then rows, broadcast over channels.
            x = x.view(n, channels * height, width).bmm(cols.transpose(1, 2)).view(n, channels, height, width)
            x = torch.matmul(rows.unsqueeze(1), x)
        else:
            x = images.float().div_(255.0)
        x = normalize_(x, self.mean, self.std)
        if self.cutout:
            x = x.masked_fill_(cutout_mask(n, height, width, self.cutout, generator, device), 0.0)
        return x
