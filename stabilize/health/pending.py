"""The steps a `GradientMonitor` has observed (`Observation`: one step's norms) and not yet brought to the host.

Two stages, both on the device: the *chunk* (the steps observed since the last count: their numbers, per-tensor
gradient norms and losses, all of one parameter subset and AMP mode), which the monitor counts in one vectorised pass
(`stabilize.health.spike_counting`); and the *unread* chunks already counted, whose per-step loss and total norm
wait for the next logging step's one transfer into the host trace (`stabilize.health.trace.StepTrace`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from stabilize.health.spike_counting import StepChunk


@dataclass
class Observation:
    """One step's per-tensor gradient norms on the device (of the parameters at ``positions``), for the record of
    a logging step and the non-finite policies; what they need of it is computed when first asked for."""

    positions: tuple[int, ...]
    norms: Tensor

    @cached_property
    def total(self) -> Tensor:
        return self.norms.square().sum().sqrt()

    @cached_property
    def tensor_nonfinite(self) -> Tensor:
        return ~torch.isfinite(self.norms)


@dataclass
class PendingSteps:
    """Observed steps on their way to the counters and to the host trace (see the module's docstring)."""

    steps: list[int] = field(default_factory=list)
    norms: list[Tensor] = field(default_factory=list)
    #: ``(position in the chunk, loss)`` of the steps that had a loss.
    losses: list[tuple[int, Tensor]] = field(default_factory=list)
    #: The chunk's parameter subset (positions) and AMP mode.
    key: tuple[tuple[int, ...], bool] = ((), False)
    #: Counted chunks not yet read: each chunk's step numbers and its ``(2, C)`` losses and total norms.
    unread: list[tuple[list[int], Tensor]] = field(default_factory=list)

    def add(self, step: int, norms: Tensor, loss: Tensor | None, key: tuple[tuple[int, ...], bool]) -> None:
        """Add an observed step to the chunk (device ops only)."""
        self.key = key
        if loss is not None:
            self.losses.append((len(self.norms), loss.detach().reshape(()).to(norms.device)))
        self.norms.append(norms)
        self.steps.append(step)

    def chunk(self, judged_from: int, device: torch.device) -> StepChunk:
        """The chunk's steps for `count_chunk`; the relative rule judges those at positions ``judged_from`` on."""
        size = len(self.norms)
        losses = [loss for _, loss in self.losses]
        positions = [position for position, _ in self.losses]
        return StepChunk(
            steps=device_integers(self.steps, device),
            norms=torch.stack(self.norms),
            losses=torch.stack(losses) if losses else None,
            loss_index=None if len(losses) in (0, size) else device_integers(positions, device),
            judged=torch.arange(size, device=device) >= judged_from,
            amp=self.key[1],
        )

    def counted(self, chunk: StepChunk, totals: Tensor) -> None:
        """Keep the counted ``chunk``'s losses (NaN where a step had none) and total norms for the trace, and start a
        new chunk."""
        size, device = len(self.steps), totals.device
        step_losses = torch.full((size,), math.nan, device=device)
        if chunk.losses is not None:
            index = chunk.loss_index if chunk.loss_index is not None else torch.arange(size, device=device)
            step_losses.index_copy_(0, index, chunk.losses.float())
        self.unread.append((self.steps, torch.stack([step_losses, totals])))
        self.steps, self.norms, self.losses = [], [], []

    def unread_values(self, device: torch.device) -> Tensor:
        """The losses, then the norms, of every unread chunk, flat (empty when none)."""
        if not self.unread:
            return torch.zeros(0, device=device)
        return torch.cat([values.to(device) for _, values in self.unread], dim=1).reshape(-1)

    def take_unread(self, values: list[float]) -> tuple[list[int], list[float], list[float]]:
        """The steps, losses and norms of the host ``values`` of `unread_values`; the unread chunks are forgotten."""
        steps = [step for chunk_steps, _ in self.unread for step in chunk_steps]
        self.unread = []
        return steps, values[: len(steps)], values[len(steps) :]


def device_integers(values: list[int], device: torch.device) -> Tensor:
    """``values`` as a long tensor on ``device`` without a host sync: an ``arange`` when they are consecutive (the
    usual steps), else a copy from pinned memory on CUDA."""
    if values == list(range(values[0], values[0] + len(values))):
        return torch.arange(values[0], values[0] + len(values), device=device)
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
