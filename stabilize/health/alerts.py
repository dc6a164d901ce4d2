"""Alerts: findings confirmed while training runs, from evidence that later steps cannot undo.

Raised by `GradientMonitor.new_alerts` at logging steps, once per
kind and run. Only findings whose evidence is complete when it is seen are alerts:

- ``"unstable"``: a loss blow-up confirmed (`stabilize.health.instability`: it lasted 16 points, or 16 points
  after it the loss had not come back);
- ``"exploding"``: an explosion by a rule that needs no future (a persistent run of spikes, a norm out of range
  five steps in a row, non-finite gradients after a spike; not the loss rule, which waits for the run's end).

Vanishing layers, a stalled loss and a collapsed gradient are judged on the run's whole course (a layer vanishing
at initialisation can recover; a plateau can end), so they come with the verdict at the end of ``fit``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from stabilize.health.criteria import HealthCriteria
from stabilize.health.explosions import classify_spikes
from stabilize.health.instability import loss_blowups
from stabilize.health.records import Alert, NonFiniteEvent, SpikeEvent
from stabilize.health.trace import TracePoint

#: Explosion rules whose evidence is complete when seen.
ALERT_RULES = ("persistent", "ceiling", "nonfinite")


def confirmed_findings(
    trace: Sequence[TracePoint],
    spikes: Sequence[SpikeEvent],
    nonfinite: Sequence[NonFiniteEvent],
    criteria: HealthCriteria,
    raised: Collection[str],
    step: int,
    judge_loss: bool = True,
) -> list[Alert]:
    """The alerts of kinds not in ``raised`` that the evidence so far confirms, raised at ``step``; ``judge_loss``
    (one optimizer) allows the loss rules."""
    alerts: list[Alert] = []
    if judge_loss and "unstable" not in raised:
        confirmed = [b for b in loss_blowups(trace) if b["confirmed_step"] is not None]
        if confirmed:
            b = confirmed[0]
            back = "still above it" if b["back_step"] is None else f"back below the bar at step {b['back_step']}"
            alerts.append(
                {
                    "kind": "unstable",
                    "step": step,
                    "evidence": f"the training loss blew up from step {b['onset_step']}: {b['peak_loss']:.4g} at step"
                    f" {b['peak_step']} against {b['start_loss']:.4g} at the start and a best of"
                    f" {b['best_before']:.4g} before ({back}, not recovered since)",
                }
            )
    if "exploding" not in raised:
        explosions, _ = classify_spikes(spikes, [], nonfinite, criteria, trace)
        sure = [e for e in explosions if e["rule"] in ALERT_RULES]
        if sure:
            e = sure[0]
            alerts.append(
                {
                    "kind": "exploding",
                    "step": step,
                    "evidence": f"the gradient exploded from step {e['first_step']} (rule '{e['rule']}', peak norm"
                    f" {e['max_norm']:.3g}, {e['steps']} step(s) far above the running median)",
                }
            )
    return alerts
