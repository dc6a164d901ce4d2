"""Where GradientHealthCallback's numbers go: the loggers' scalars, TensorBoard histograms and the flow figure."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.compat.proto.summary_pb2 import Summary

from stabilize.errors import ConfigurationError
from stabilize.health.figures import Histogram, gradient_histograms, temporal_figure
from stabilize.health.layers import LayerIndex
from stabilize.health.records import StepRecord


class _Cadence:
    """Due every ``every`` steps (0: never), but never twice within ``min_seconds`` of wall time."""

    def __init__(self, every: int, min_seconds: float, clock: Callable[[], float]) -> None:
        self.every, self.min_seconds, self.clock = every, min_seconds, clock
        self.last: float | None = None

    def due(self, step: int) -> bool:
        if not self.every or step % self.every:
            return False
        now = self.clock()
        if self.last is not None and now - self.last < self.min_seconds:
            return False
        self.last = now
        return True


class HealthOutput:
    """Writes one logging step: every scalar in one call per logger (one event for TensorBoard), histograms and
    the gradient-flow figure on their own cadences (steps and wall time), since each costs far more than scalars.

    Args:
        histogram_every: Steps between histograms (0: none).
        figure_every: Steps between flow figures (0: none).
        histogram_min_seconds: Least wall time between two histogram writes.
        figure_min_seconds: Least wall time between two figures.
        clock: Source of wall time in seconds.
    """

    def __init__(
        self,
        histogram_every: int,
        figure_every: int,
        histogram_min_seconds: float,
        figure_min_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = (histogram_every, figure_every, histogram_min_seconds, figure_min_seconds, clock)
        #: Histogram and figure cadences per optimizer (key prefix): each optimizer counts its own steps and wall
        #: time, so one that steps in turn with another is not crowded out.
        self._cadences: dict[str, tuple[_Cadence, _Cadence]] = {}

    def cadences(self, prefix: str) -> tuple[_Cadence, _Cadence]:
        """The histogram and figure cadences of the optimizer whose keys carry ``prefix``."""
        if prefix not in self._cadences:
            histogram_every, figure_every, histogram_seconds, figure_seconds, clock = self._settings
            self._cadences[prefix] = (
                _Cadence(histogram_every, histogram_seconds, clock),
                _Cadence(figure_every, figure_seconds, clock),
            )
        return self._cadences[prefix]

    @staticmethod
    def check_cadence(**values: float | None) -> None:
        """Validate step intervals (``*_steps``: a non-negative integer or ``None``; ``log_every_n_steps`` positive)
        and wall-time minimums (``*_s``: non-negative seconds).

        Raises:
            ConfigurationError: Naming the first argument out of range or of the wrong type.
        """
        for name, value in values.items():
            if name.endswith("_steps"):
                wrong_type = value is not None and (not isinstance(value, int) or isinstance(value, bool))
                if wrong_type or (value is not None and value < 0):
                    raise ConfigurationError(f"{name} must be a non-negative integer or None, got {value!r}.")
                if name == "log_every_n_steps" and value == 0:
                    raise ConfigurationError("log_every_n_steps must be positive.")
            elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
                raise ConfigurationError(f"{name} must be a non-negative number of seconds, got {value!r}.")

    @staticmethod
    def scalars(loggers: Sequence[Logger], metrics: Mapping[str, float], step: int) -> None:
        """Send ``metrics`` to every logger in one call; a plain TensorBoardLogger gets them as one event.

        TensorBoard's ``add_scalar`` queues one event per key, and with ~100 per-layer keys the queue's locking
        cost more than all the statistics; one summary with every value is one queue entry.
        """
        for logger in loggers:
            if type(logger) is TensorBoardLogger and not logger._prefix:
                summary = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in metrics.items()])
                logger.experiment._get_file_writer().add_summary(summary, step)
            else:
                logger.log_metrics(dict(metrics), step=step)

    @staticmethod
    def tensorboard_writers(loggers: Sequence[Logger]) -> list[Any]:
        return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]

    @staticmethod
    def write_histograms(writers: Sequence[Any], tag_prefix: str, histograms: Sequence[Histogram], step: int) -> None:
        for histogram in histograms:
            values = histogram._asdict()
            tag = f"{tag_prefix}{values.pop('name')}"
            for writer in writers:
                writer.add_histogram_raw(tag, **values, global_step=step)

    @staticmethod
    def write_figure(writers: Sequence[Any], tag: str, figure: Figure, step: int) -> None:
        for writer in writers:
            writer.add_figure(tag, figure, global_step=step, close=False)

    def pictures(
        self,
        loggers: Sequence[Logger],
        prefix: str,
        layers: LayerIndex,
        positions: tuple[int, ...],
        record: StepRecord,
        step: int,
        draw: Callable[[list[str], list[float]], Figure],
        own_step: int | None = None,
        final: bool = False,
    ) -> None:
        """Histograms and the flow figure of a logging step, each when its cadence says so (TensorBoard only).
        ``step`` is where they are written; ``own_step`` (default ``step``), the optimizer's own step count the
        cadences run on. ``final``: the last logging step of the run, drawn whatever the cadences say, so that
        TensorBoard shows the gradient flow at the end of training, not only an early step."""
        writers = self.tensorboard_writers(loggers)
        histograms, figures = self.cadences(prefix)
        own_step = step if own_step is None else own_step
        # Sharded gradients (FSDP2) would be one process's slice: no histogram rather than a wrong one.
        if writers and not layers.sharded and (histograms.due(own_step) or (final and histograms.every)):
            self.write_histograms(writers, f"grad_hist/{prefix}", gradient_histograms(layers, positions), step)
            magnitudes = gradient_histograms(layers, positions, magnitude=True)
            self.write_histograms(writers, f"grad_log10/{prefix}", magnitudes, step)
        if writers and (figures.due(own_step) or (final and figures.every)):
            names = list(record["layers"])
            figure = draw(names, [record["layers"][name]["grad_norm"] for name in names])
            self.write_figure(writers, f"grad_health/{prefix}flow", figure, step)
            if "temporal_grad_norms" in record:
                temporal = temporal_figure(record["temporal_grad_norms"])
                self.write_figure(writers, f"grad_health/{prefix}temporal", temporal, step)
