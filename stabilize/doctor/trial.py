"""One short training run of the doctor, and what it measured: the verdict and the outcome."""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from torch import Tensor
from typing_extensions import override

from stabilize.callbacks.gradient_health import GradientHealthCallback
from stabilize.doctor.remedies import Remedy
from stabilize.health.diagnosis import verdict, verdict_class
from stabilize.health.records import HealthSummary

#: The verdict classes from worst to mildest: a run's class is its worst optimizer's.
SEVERITY = ("exploding", "unstable", "vanishing", "collapse", "stalled", "healthy")
#: A trial learned when its final loss is at most this fraction of its trivial baseline.
LEARNED_FRACTION = 0.9
#: Trailing steps whose median is a run's final loss (a hard batch at the end is not the outcome).
FINAL_STEPS = 32

ModelFactory = Callable[[], LightningModule]
DataSource = Any  # a LightningDataModule, a DataLoader, or a callable returning either


@dataclass
class Trial:
    """A short run of the doctor: the failing configuration (``remedy`` None: the probe) or one remedy."""

    remedy: Remedy | None
    verdict: str
    verdict_class: str
    #: The training loss at the first step and the median of the last `FINAL_STEPS` (None: no single loss,
    #: e.g. a GAN's two optimizers; ``inf`` when it went non-finite).
    start_loss: float | None
    final_loss: float | None
    seconds: float
    #: Whether the trial repaired the run (`repaired` decides).
    works: bool = False
    error: str | None = None
    #: The lowest 32-step median loss the run reached (a run that learned, then blew up: how far it had got).
    best_loss: float | None = None
    #: (step, smoothed loss) of every trace point, for the plot.
    curve: list[tuple[int, float]] = field(default_factory=list)
    diagnosis: str = ""
    #: The health summary of each optimizer (what the plan reads from the probe).
    summaries: dict[str, HealthSummary] = field(default_factory=dict, repr=False)
    #: The class names of the optimizers the run trained with (after any remedy's swap).
    optimizers: tuple[str, ...] = ()
    #: The doctor's ``monitor`` metric: its first logged training value (None: validation only, or not
    #: monitored) and its final value (the median of its last `FINAL_STEPS` training values, or the value of a
    #: validation run after training when the module logs it only there; None: never logged).
    start_metric: float | None = None
    final_metric: float | None = None
    #: The names of the metrics the run logged (what a ``monitor`` may name).
    logged_metrics: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "probe (as configured)" if self.remedy is None else self.remedy.name


def run_trial(
    model: ModelFactory,
    data: DataSource,
    remedy: Remedy | None,
    steps: int,
    seed: int,
    trainer_kwargs: Mapping[str, Any],
    callbacks: Callable[[], list[Callback]],
    template: LightningModule | None = None,
    monitor: str | None = None,
) -> Trial:
    """Train ``model`` (or ``remedy``'s variant of ``template``) for ``steps`` optimizer steps from ``seed`` with
    the run's own ``callbacks`` and the remedy's, and measure it (and the metric ``monitor`` the module logs). An
    exception is a failed trial, not a crash."""
    seed_everything(seed, verbose=False)
    start = time.perf_counter()
    own = callbacks()
    health = next((c for c in own if isinstance(c, GradientHealthCallback)), None)
    if health is None:
        health = GradientHealthCallback(verbose=False)
        own = [health, *own]
    metric = MetricTrace(monitor) if monitor is not None else None
    module: LightningModule | None = None
    trainer: Trainer | None = None
    error = None
    try:
        with warnings.catch_warnings(), _Quiet("lightning.pytorch", "lightning.fabric"):
            warnings.simplefilter("ignore")
            module = remedy.variant.build(template) if remedy and remedy.variant and template else model()
            trainer = Trainer(
                **{
                    "max_steps": steps,
                    "max_epochs": -1,
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "num_sanity_val_steps": 0,
                    "limit_val_batches": 0,
                    **trainer_kwargs,
                    **(remedy.trainer if remedy else {}),
                    "callbacks": [*own, *(remedy.make_callbacks() if remedy else []), *([metric] if metric else [])],
                }
            )
            source = data() if callable(data) else data
            if isinstance(source, LightningDataModule):
                trainer.fit(module, datamodule=source)
            else:
                trainer.fit(module, train_dataloaders=source)
            if metric is not None and not metric.values and isinstance(source, LightningDataModule):
                metric.validated = _validate(module, source, monitor, trainer_kwargs)
    except Exception as failure:  # a variant that does not build, a run that raised on NaN: the trial failed
        error = f"{type(failure).__name__}: {failure}"
    seconds = time.perf_counter() - start
    summaries = health.summary()
    classes = [verdict_class(s) for s in summaries.values()] or ["healthy"]
    worst = min(classes, key=SEVERITY.index)
    if error is not None and worst == "healthy":
        worst = "exploding" if "finite" in error.lower() else "failed"
    start_loss, final_loss, best_loss, curve = _losses(health, len(summaries))
    return Trial(
        remedy,
        "; ".join(verdict(s) for s in summaries.values()) or "no step taken",
        worst,
        start_loss,
        final_loss,
        seconds,
        error=error,
        best_loss=best_loss,
        curve=curve,
        diagnosis=health.diagnosis(module) if module is not None and summaries else "",
        summaries=summaries,
        optimizers=tuple(type(o).__name__ for o in trainer.optimizers) if trainer is not None else (),
        start_metric=metric.values[0] if metric is not None and metric.values else None,
        final_metric=metric.final() if metric is not None else None,
        logged_metrics=tuple(sorted(trainer.callback_metrics)) if trainer is not None else (),
    )


class MetricTrace(Callback):
    """Record one logged metric after every training batch (what the module's ``self.log`` put in
    ``trainer.callback_metrics``), for the doctor's ``monitor``. The values stay on their device until read: a host
    read per batch would synchronise every step of the trial."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._logged: list[Tensor] = []
        self._values: list[float] = []
        #: The metric of a validation run after training, when training never logged it.
        self.validated: float | None = None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        value = trainer.callback_metrics.get(self.name)
        if value is not None:
            # A copy: the logged tensor may be updated in place at a later step.
            self._logged.append(torch.as_tensor(value).detach().float().reshape(()).clone())

    @property
    def values(self) -> list[float]:
        """Every training batch's value, oldest first, non-finite ones as NaN (one host transfer for those logged
        since the last read)."""
        if len(self._values) < len(self._logged):
            fresh = torch.stack(self._logged[len(self._values) :]).tolist()
            self._values += [v if math.isfinite(v) else math.nan for v in fresh]
        return self._values

    def final(self) -> float | None:
        """The median of the last `FINAL_STEPS` values (NaN when any of them is not finite), else the validated
        value."""
        values = self.values
        if not values:
            return self.validated
        tail = values[-FINAL_STEPS:]
        return math.nan if any(math.isnan(v) for v in tail) else statistics.median(tail)


def _validate(
    module: LightningModule, source: LightningDataModule, name: str | None, trainer_kwargs: Mapping[str, Any]
) -> float | None:
    """``name`` after one validation pass of the trained ``module`` (None: the module does not log it there)."""
    trainer = Trainer(
        **{
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **{k: v for k, v in trainer_kwargs.items() if k in ("accelerator", "devices", "precision")},
        }
    )
    trainer.validate(module, datamodule=source, verbose=False)
    value = trainer.callback_metrics.get(name or "")
    return float(value) if value is not None else None


def _losses(
    health: GradientHealthCallback, optimizers: int
) -> tuple[float | None, float | None, float | None, list[tuple[int, float]]]:
    """The first step's loss, the final loss, the best steady loss and the smoothed curve of a single-optimizer
    run (all None for several optimizers, or no loss)."""
    if optimizers != 1:
        return None, None, None, []
    points = health.trace_of(0)
    losses = [p["loss"] for p in points]
    if not losses or all(math.isnan(v) for v in losses):
        return None, None, None, []
    tail = [v if math.isfinite(v) else math.inf for v in losses[-FINAL_STEPS:]]
    start = next((v for v in losses if math.isfinite(v)), math.inf)
    steady = [p["steady_loss"] for p in points if math.isfinite(p["steady_loss"])]
    curve = [(p["step"], p["smoothed_loss"]) for p in points]
    return start, statistics.median(tail), min(steady, default=None), curve


class _Quiet:
    """Silence the named loggers below ERROR for the block (a trial's Trainer would print its setup each time)."""

    def __init__(self, *names: str) -> None:
        self.loggers = [logging.getLogger(name) for name in names]
        self.levels: list[int] = []

    def __enter__(self) -> None:
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
