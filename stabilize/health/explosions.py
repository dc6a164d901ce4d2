"""Which gradient spikes were explosions: the evidence that a spike was out of control, not a hard batch.

A spike (a step far above the running median of recent norms) is what every gradient monitor counts; on its own it
is weak evidence. A healthy run meets hard batches (outliers in the data, a rare class, a tiny noisy batch) and its
norm jumps for a step, then training goes on as before. An exploding run differs in what follows the jump, so a
spike counts as an explosion only with one of these pieces of evidence (each named by its ``rule``):

- ``"persistent"``: a run of at least ``spike_persistence`` (32) consecutive spikes. A diverging run's norm grows
  geometrically, faster than its running median can follow, so it stays above ``exploding_factor`` x the median
  until it overflows; a hard batch makes one spike, and a healthy run knocked off course by one (or learning a
  task in a sudden jump, as recurrent nets do) makes a run of a few steps (up to 19 in the pathology zoo) before
  its norm comes back. *Growth is not explosion*: a gradient that grows because a model started near zero begins
  to learn (its loss falling) also outruns its median for many steps; with the per-step trace, a persistent run
  over which the smoothed loss fell is left a transient spike.
- ``"nonfinite"``: non-finite gradients appeared at or after the spike, within ``median_window`` steps.
- ``"loss"``: the spike undid training: the loss blew up from it (within its smoothing window before, or a median
  window after) and never recovered (`stabilize.health.instability`); or every loss after the spike (at least
  `MIN_POINTS_AFTER` smoothed points of the trace, or `MIN_RECORDS_AFTER` records) is above the largest
  of the `RECORDS_BEFORE` losses before it, and by more than half of the progress the run had made until then
  (its first losses minus that level). Differences against the run's own progress make the rule free of the loss's
  scale and sign; a plateau's noise or an outlier that costs a little accuracy does not trip it, and a run that had
  made no progress (a GAN's losses) is not judged by it.
- ``"ceiling"``: the norm was out of range (above ``gradient_to_loss_ceiling`` times the loss, or above an absolute
  ``exploding_threshold`` the user set) for ``CEILING_PERSISTENCE`` consecutive steps: a gradient far out of
  proportion to its loss from the first step on, as in an IRNN whose recurrence explodes, leaves no median to jump
  over.

Everything else is a *transient* spike, reported with its steps and peak so that it can be found in TensorBoard.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

from stabilize.health.criteria import HealthCriteria
from stabilize.health.records import ExplosionEvent, LossBlowup, LossPoint, NonFiniteEvent, SpikeEvent, StepRecord
from stabilize.health.trace import SMOOTHING_POINTS, TracePoint

#: Interval losses before a spike that define the level the loss must get back below.
RECORDS_BEFORE = 5
#: Interval losses after a spike needed before the loss rule judges it (fewer: the spike is given the benefit).
MIN_RECORDS_AFTER = 3
#: The same for the per-step trace, in points (its losses smoothed over eight points: 3 records of 10 steps ~ 32).
MIN_POINTS_AFTER = 32


def classify_spikes(
    spikes: Sequence[SpikeEvent],
    history: Sequence[StepRecord],
    nonfinite: Sequence[NonFiniteEvent],
    criteria: HealthCriteria,
    trace: Sequence[TracePoint] | None = None,
    blowups: Sequence[LossBlowup] = (),
) -> tuple[list[ExplosionEvent], list[SpikeEvent]]:
    """Split spike events into explosions (with the rule that confirmed each) and transient spikes. With the run's
    per-step ``trace``, the loss rules read it (the same at any logging cadence) instead of the records; a spike
    followed by one of the loss ``blowups`` the run did not recover from (see
    `stabilize.health.instability`) undid training too."""
    explosions: list[ExplosionEvent] = []
    transient: list[SpikeEvent] = []
    for event in merge_runs(spikes, [p["step"] for p in trace] if trace else None):
        rule = _evidence(event, history, nonfinite, criteria, trace, blowups)
        if rule is None:
            transient.append(event)
        else:
            explosions.append(
                {
                    "first_step": event["first_step"],
                    "last_step": event["last_step"],
                    "steps": event["steps"],
                    "max_norm": event["max_norm"],
                    "peak_ratio": event["peak_ratio"],
                    "rule": rule,
                }
            )
    return explosions, transient


def merge_runs(spikes: Sequence[SpikeEvent], steps: Sequence[int] | None = None) -> list[SpikeEvent]:
    """Join events that are one run of spikes cut by a logging step: the next starts within one step of the
    optimizer after the last. ``steps``: the first steps of the optimizer's trace points, whose smallest spacing is
    that step: a GAN's generator steps once in ``n + 1`` global steps (``n`` discriminator steps), so its next step
    is ``n + 1`` on; in a run long enough that a point stands for several steps, the point's span, the finest the
    loss rules read the trace at anyway. Without them, the next global step."""
    spacing = min((b - a for a, b in itertools.pairwise(steps) if b > a), default=1) if steps else 1
    merged: list[SpikeEvent] = []
    for event in spikes:
        previous = merged[-1] if merged else None
        if previous is not None and 0 < event["first_step"] - previous["last_step"] <= spacing:
            merged[-1] = {
                "first_step": previous["first_step"],
                "last_step": event["last_step"],
                "steps": previous["steps"] + event["steps"],
                "max_norm": max(previous["max_norm"], event["max_norm"]),
                "peak_ratio": max(previous["peak_ratio"], event["peak_ratio"]),
                "peak_step": (event if event["peak_ratio"] > previous["peak_ratio"] else previous).get("peak_step", -1),
                "longest_run": max(previous["longest_run"], event["longest_run"]),
                "persistent_steps": previous["persistent_steps"] + event["persistent_steps"],
                "ceiling_steps": previous["ceiling_steps"] + event["ceiling_steps"],
                "persistent_ceiling": previous["persistent_ceiling"] + event["persistent_ceiling"],
                "record_step": event["record_step"],
            }
        else:
            merged.append(event)
    return merged


def _evidence(
    event: SpikeEvent,
    history: Sequence[StepRecord],
    nonfinite: Sequence[NonFiniteEvent],
    criteria: HealthCriteria,
    trace: Sequence[TracePoint] | None,
    blowups: Sequence[LossBlowup],
) -> str | None:
    # Out-of-range steps are spikes too, so a long run of them is also persistent: name the stronger evidence.
    if event["persistent_ceiling"]:
        return "ceiling"
    if event["persistent_steps"] and not (trace and loss_fell_over(trace, event["first_step"], event["last_step"])):
        return "persistent"
    horizon = event["last_step"] + criteria.median_window
    if any(event["first_step"] <= e["first_step"] <= horizon for e in nonfinite):
        return "nonfinite"
    if any(
        not b["recovered"] and event["first_step"] - SMOOTHING_POINTS <= b["onset_step"] <= horizon for b in blowups
    ):
        return "loss"
    if trace:
        smoothed: list[LossPoint] = [
            {"step": p["step"], "loss": p["smoothed_loss"], "global_norm": p["global_norm"]} for p in trace
        ]
        never = loss_never_recovered(smoothed, event["first_step"], event["last_step"], MIN_POINTS_AFTER)
    else:
        never = loss_never_recovered(history, event["first_step"], event["record_step"])
    return "loss" if never else None


def loss_fell_over(trace: Sequence[TracePoint], first_step: int, last_step: int) -> bool:
    """Whether the smoothed loss at ``last_step`` is below its value just before ``first_step``: the gradient grew
    while the model learned."""
    before = [p["smoothed_loss"] for p in trace if p["step"] < first_step and math.isfinite(p["smoothed_loss"])]
    at_end = [p["smoothed_loss"] for p in trace if p["step"] <= last_step and math.isfinite(p["smoothed_loss"])]
    return bool(before) and bool(at_end) and at_end[-1] < before[-1]


def loss_never_recovered(
    history: Sequence[LossPoint], spike_step: int, record_step: int, min_after: int = MIN_RECORDS_AFTER
) -> bool:
    """Whether every loss after ``record_step`` (at least ``min_after`` of them) stays above the loss's level
    before ``spike_step`` by more than half the progress made until then."""
    before = [r["loss"] for r in history if r["step"] < spike_step and math.isfinite(r.get("loss", math.nan))]
    after = [r.get("loss", math.nan) for r in history if r["step"] > record_step]
    if not before or len(after) < min_after:
        return False
    level = max(before[-RECORDS_BEFORE:])
    start = statistics.median(before[:RECORDS_BEFORE])
    progress = start - min(before)
    if progress <= 0:
        return False
    # A non-finite loss after the spike is no recovery.
    return all(not math.isfinite(loss) or loss > level + progress / 2 for loss in after)
