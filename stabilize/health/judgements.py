"""The judgements the verdict rules make from a run's records: one function for a live monitor and a saved file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from stabilize.health.collapse import judged_collapse
from stabilize.health.criteria import HealthCriteria
from stabilize.health.explosions import classify_spikes
from stabilize.health.records import (
    ExplosionEvent,
    GradientCollapse,
    LossStall,
    NonFiniteEvent,
    SpikeEvent,
    StepRecord,
)
from stabilize.health.stall import loss_stall


class Judgements(TypedDict):
    """The parts of a :class:`~stabilize.health.HealthSummary` that the rules decide rather than the records hold."""

    explosions: list[ExplosionEvent]
    transient_spikes: list[SpikeEvent]
    gradient_collapse: GradientCollapse | None
    loss_stall: LossStall | None


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
) -> Judgements:
    """Spikes split into explosions and transient spikes, the gradient collapse and (with ``judge_loss``: one
    optimizer) the loss stall. ``split``: explosions and transient spikes already decided (a saved file without the
    raw ``spikes``), which the collapse then takes as given."""
    explosions, transient = split if split is not None else classify_spikes(spikes, history, nonfinite, criteria)
    return {
        "explosions": explosions,
        "transient_spikes": transient,
        "gradient_collapse": judged_collapse(history, explosions, criteria.collapse_factor),
        "loss_stall": loss_stall(history) if judge_loss else None,
    }
