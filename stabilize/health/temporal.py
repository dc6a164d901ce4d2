"""TemporalProbe: the gradient over time steps, ‖∂L/∂h_t‖, of a recurrent layer's output sequence."""

from __future__ import annotations

from torch import Tensor
from torch.utils.hooks import RemovableHandle


class TemporalProbe:
    """Hooks a ``(N, T, H)`` state sequence for one backward pass and keeps the gradient norm at each step ``t``
    (over the batch and the units) as a ``(T,)`` device tensor. A flat curve means credit reaches every step; a
    curve that falls by orders of magnitude toward ``t = 0`` means long-range credit assignment is lost."""

    def __init__(self) -> None:
        self.norms: Tensor | None = None
        self._handle: RemovableHandle | None = None

    def watch(self, states: Tensor) -> None:
        if states.ndim == 3 and states.requires_grad:
            self._handle = states.register_hook(self._capture)

    def take(self) -> Tensor | None:
        """The norms of the last watched backward pass (once), and the hook gone."""
        norms, self.norms = self.norms, None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return norms

    def _capture(self, grad: Tensor) -> None:
        self.norms = grad.detach().float().norm(dim=(0, 2))
