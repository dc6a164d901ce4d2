"""The run's training loss and gradient norm at every optimizer step, kept on the host at a bounded size.

The device counts every step (`stabilize.health.spike_counting`); each step's loss and total norm reach the host
with the next logging step's single transfer and are appended here in step order. So what the rules read from a
`StepTrace` is the same whether the Trainer logs every step or every 50: the verdict does not depend on the
logging cadence (records, which hold per-layer numbers, are still taken at logging steps only).

A long run would make the trace long, so it keeps at most `MAX_POINTS` points: when full, neighbouring points
are averaged in pairs and each point stands for twice as many steps from then on. Which steps a point averages
depends only on the order of the steps, never on when they arrived.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

#: Points kept; a run of more steps averages 2, 4, 8, ... steps per point.
MAX_POINTS = 4096
#: Points in the trailing median that smooths the loss (a hard batch or two is not a trend).
SMOOTHING_POINTS = 8
#: Points in the longer trailing median whose lowest value is a run's best loss so far (see
#: `stabilize.health.instability`).
STEADY_POINTS = 32


class TracePoint(TypedDict):
    """One point of the trace: the first step it covers, its mean loss (NaN without one), its smoothed loss (the
    median of the last `SMOOTHING_POINTS` points' losses), its steady loss (of the last
    `STEADY_POINTS`) and the mean total gradient norm (NaN without a finite one)."""

    step: int
    loss: float
    smoothed_loss: float
    steady_loss: float
    global_norm: float


@dataclass
class StepTrace:
    """Losses and total gradient norms of every observed step, in step order (see the module's docstring)."""

    #: Steps per point (a power of two).
    resolution: int = 1
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    #: The smoothed loss of each closed point (derived: kept so that reading the trace costs no re-smoothing).
    smoothed: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    #: The point being filled: its first step, loss and norm sums and counts.
    _open: list[float] = field(default_factory=lambda: [0, 0.0, 0, 0.0, 0, 0])

    def extend(self, steps: Sequence[int], losses: Sequence[float], norms: Sequence[float]) -> None:
        """Append consecutive observed steps (a NaN loss: the step had none; a non-finite norm is left out)."""
        for step, loss, norm in zip(steps, losses, norms):
            point = self._open
            if point[5] == 0:
                point[0] = step
            if math.isfinite(loss):
                point[1] += loss
                point[2] += 1
            if math.isfinite(norm):
                point[3] += norm
                point[4] += 1
            point[5] += 1
            if point[5] == self.resolution:
                self._close()

    def _close(self) -> None:
        first, loss_sum, loss_count, norm_sum, norm_count, _ = self._open
        self.steps.append(int(first))
        self.losses.append(loss_sum / loss_count if loss_count else math.nan)
        self.norms.append(norm_sum / norm_count if norm_count else math.nan)
        self._open = [0, 0.0, 0, 0.0, 0, 0]
        self.smoothed.append(_median_of_finite(self.losses[-SMOOTHING_POINTS:]))
        self.steady.append(_median_of_finite(self.losses[-STEADY_POINTS:]))
        if len(self.steps) >= MAX_POINTS:
            self.steps = self.steps[::2]
            self.losses = [_mean_of_pair(self.losses, i) for i in range(0, len(self.losses), 2)]
            self.norms = [_mean_of_pair(self.norms, i) for i in range(0, len(self.norms), 2)]
            self.smoothed = trailing_median(self.losses, SMOOTHING_POINTS)
            self.steady = trailing_median(self.losses, STEADY_POINTS)
            self.resolution *= 2

    def __len__(self) -> int:
        return len(self.steps) + (self._open[5] > 0)

    def points(self) -> list[TracePoint]:
        """Every point, the one being filled included, with the smoothed loss (causal: from earlier points only)."""
        steps, losses, norms = list(self.steps), list(self.losses), list(self.norms)
        smoothed, steady = list(self.smoothed), list(self.steady)
        first, loss_sum, loss_count, norm_sum, norm_count, size = self._open
        if size:
            steps.append(int(first))
            losses.append(loss_sum / loss_count if loss_count else math.nan)
            norms.append(norm_sum / norm_count if norm_count else math.nan)
            smoothed.append(_median_of_finite(losses[-SMOOTHING_POINTS:]))
            steady.append(_median_of_finite(losses[-STEADY_POINTS:]))
        return [
            {"step": step, "loss": loss, "smoothed_loss": smooth, "steady_loss": long, "global_norm": norm}
            for step, loss, smooth, long, norm in zip(steps, losses, smoothed, steady, norms)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "steps": list(self.steps),
            "losses": list(self.losses),
            "norms": list(self.norms),
            "open": list(self._open),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StepTrace:
        losses = [_float(v) for v in state["losses"]]
        return cls(
            state["resolution"],
            list(state["steps"]),
            losses,
            [_float(v) for v in state["norms"]],
            trailing_median(losses, SMOOTHING_POINTS),
            trailing_median(losses, STEADY_POINTS),
            list(state["open"]),
        )


def trailing_median(values: Sequence[float], window: int) -> list[float]:
    """The median of the finite values among the last ``window`` (this one included) at each position; NaN where
    none is finite."""
    return [_median_of_finite(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _median_of_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _mean_of_pair(values: list[float], i: int) -> float:
    pair = [v for v in values[i : i + 2] if math.isfinite(v)]
    return sum(pair) / len(pair) if pair else math.nan


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)
