"""The judgements the verdict rules make from a run's records: one function for a live monitor and a saved file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from stabilize.health.collapse import judged_collapse
from stabilize.health.criteria import HealthCriteria
from stabilize.health.explosions import classify_spikes
from stabilize.health.instability import loss_blowups
from stabilize.health.records import (
    ExplosionEvent,
    GradientCollapse,
    LossBlowup,
    LossPoint,
    LossStall,
    NonFiniteEvent,
    SpikeEvent,
    StepRecord,
)
from stabilize.health.stall import loss_progress, loss_stall
from stabilize.health.trace import TracePoint


class Judgements(TypedDict):
    """The parts of a `HealthSummary` that the rules decide rather than the records hold."""

    explosions: list[ExplosionEvent]
    transient_spikes: list[SpikeEvent]
    gradient_collapse: GradientCollapse | None
    loss_stall: LossStall | None
    loss_blowups: list[LossBlowup]
    loss_progress: float | None


def judges_loss(optimizers: int) -> bool:
    """Whether the loss-stall rule judges a run with this many optimizers: one only. The losses of adversarial
    training (a GAN's generator and discriminator, one optimizer each) hover by design, so a flat loss says nothing
    there."""
    return optimizers == 1


def judgements(
    history: Sequence[StepRecord],
    spikes: Sequence[SpikeEvent],
    nonfinite: Sequence[NonFiniteEvent],
    criteria: HealthCriteria,
    judge_loss: bool = True,
    split: tuple[list[ExplosionEvent], list[SpikeEvent]] | None = None,
    trace: Sequence[TracePoint] | None = None,
) -> Judgements:
    """Spikes split into explosions and transient spikes, the gradient collapse and (with ``judge_loss``: one
    optimizer) the loss stall and blow-ups. ``split``: explosions and transient spikes already decided (a saved file
    without the raw ``spikes``), which the collapse then takes as given.

    ``trace``: the run's every step (`StepTrace`), which the loss and collapse rules
    then read instead of the logging steps' records, so that the verdict does not depend on the logging cadence; a
    file saved before the trace existed is judged from its records."""
    series: Sequence[LossPoint] = trace if trace else history
    blowups = loss_blowups(trace) if judge_loss and trace else []
    explosions, transient = (
        split if split is not None else classify_spikes(spikes, history, nonfinite, criteria, trace or None, blowups)
    )
    return {
        "explosions": explosions,
        "transient_spikes": transient,
        "gradient_collapse": judged_collapse(series, explosions, criteria.collapse_factor),
        "loss_stall": loss_stall(series) if judge_loss else None,
        "loss_blowups": blowups,
        "loss_progress": loss_progress(series) if judge_loss else None,
    }
