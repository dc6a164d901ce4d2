"""Activation statistics of one forward pass: dead ReLU channels and saturated sigmoid/tanh outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from stabilize.health.traits import RELU_LIKE, SATURATING


class ActivationProbe:
    """Forward hooks on the activation modules of a network, attached only for the passes that are measured.

    Each statistic stays a device scalar until it is read together with everything else of a logging step.

    Args:
        saturation_threshold: An output of sigmoid counts as saturated above this value or below one minus it;
            of tanh, beyond this absolute value.
    """

    def __init__(self, saturation_threshold: float = 0.99) -> None:
        self.saturation_threshold = saturation_threshold
        #: Module name -> (``"dead"`` or ``"saturated"``, fraction as a device scalar).
        self.stats: dict[str, tuple[str, Tensor]] = {}
        self._hooks: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self, module: nn.Module) -> None:
        for name, child in module.named_modules():
            if isinstance(child, RELU_LIKE + SATURATING):
                self._hooks.append(child.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def metrics(self, values: list[float], prefix: str = "") -> dict[str, float]:
        """Logged keys (``activation_dead/<module>``, ``activation_saturated/<module>``) for ``values`` read in the
        order of `tensors`."""
        return {f"activation_{self.stats[name][0]}/{prefix}{name}": v for name, v in zip(sorted(self.stats), values)}

    def dead_fractions(self, values: list[float]) -> dict[str, float]:
        """Module name -> dead-channel fraction, for the ReLU-like modules among ``values`` (read in the order of
        `tensors`)."""
        return {name: v for name, v in zip(sorted(self.stats), values) if self.stats[name][0] == "dead"}

    def tensors(self) -> list[Tensor]:
        return [self.stats[name][1] for name in sorted(self.stats)]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or not module.training:
                return
            with torch.no_grad():
                out = output.detach()
                if isinstance(module, RELU_LIKE):
                    channels = out.transpose(0, 1).reshape(out.shape[1], -1) if out.ndim > 1 else out.view(1, -1)
                    self.stats[name] = ("dead", (channels.amax(1) <= 0).float().mean())
                else:
                    limit = self.saturation_threshold
                    low = -limit if isinstance(module, (nn.Tanh, nn.Hardtanh)) else 1 - limit
                    self.stats[name] = ("saturated", ((out > limit) | (out < low)).float().mean())

        return record
