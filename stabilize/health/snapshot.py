"""BufferSnapshot: undo what a skipped step's forward pass wrote into a module's buffers."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy


class BufferSnapshot:
    """A copy of every buffer of a module (BatchNorm running statistics and counters), refreshed with one fused
    copy, so that a step dropped for non-finite gradients can also drop what its forward pass wrote."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._copies: list[Tensor] = []

    def take(self, module: nn.Module) -> None:
        # A lazy module's buffers have no values before its first forward pass, and become the same objects with a
        # new shape after it.
        buffers = [b for b in module.buffers() if not is_lazy(b)]
        same = len(buffers) == len(self._buffers) and all(
            a is b and a.shape == c.shape for a, b, c in zip(buffers, self._buffers, self._copies)
        )
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
