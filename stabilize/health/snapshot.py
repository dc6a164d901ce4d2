"""BufferSnapshot: undo what a skipped step's forward pass wrote into a module's buffers."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BufferSnapshot:
    """A copy of every buffer of a module (BatchNorm running statistics and counters), refreshed with one fused
    copy, so that a step dropped for non-finite gradients can also drop what its forward pass wrote."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._copies: list[Tensor] = []

    def take(self, module: nn.Module) -> None:
        buffers = list(module.buffers())
        same = len(buffers) == len(self._buffers) and all(a is b for a, b in zip(buffers, self._buffers))
        if not same:
            self._buffers = buffers
            self._copies = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, buffers)

    def restore(self) -> None:
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._copies)
