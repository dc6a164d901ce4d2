"""A `GradientMonitor`'s whole run as data: the `HealthSummary` the diagnosis, the verdict and ``save_json`` read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from stabilize.health.criteria import DEAD_UNITS_FRACTION
from stabilize.health.judgements import judgements
from stabilize.health.records import HealthSummary, largest_update
from stabilize.health.trace import TracePoint

if TYPE_CHECKING:
    from stabilize.health.monitor import GradientMonitor


def run_summary(monitor: GradientMonitor, trace: Sequence[TracePoint], judge_loss: bool = True) -> HealthSummary:
    """The summary of ``monitor``'s records and its per-step ``trace`` (read to the host), with the judgements of
    the spikes and the loss (`stabilize.health.judgements`; ``judge_loss=False``: not the loss stall)."""
    history = monitor.history
    last = history[-1] if history else None
    worst, temporal, last_temporal = (
        monitor.worst_depth_ratio,
        monitor.worst_temporal_ratio,
        monitor.last_temporal_ratio,
    )
    judged = judgements(history, monitor.spikes, monitor.nonfinite, monitor.criteria, judge_loss, trace=trace)
    layers = monitor.layers

    def layers_without(names: set[str]) -> list[str]:
        """The watched layers not in ``names``, in forward order (none once the layers are detached)."""
        return [name for name in layers.names if name not in names] if layers is not None else []

    return {
        "steps": monitor.steps,
        "logged_steps": len(history),
        "vanishing_layers_now": {
            name: monitor.vanishing_since[name] for name in (last["vanishing_layers"] if last else [])
        },
        "ever_vanished": dict(monitor.first_vanished),
        "nonfinite": list(monitor.nonfinite),
        "skipped_steps": list(monitor.skipped_steps),
        "amp_skipped_steps": monitor.amp_skipped,
        "worst_depth_ratio": None if worst is None else {"ratio": worst[0], "step": worst[1]},
        "worst_temporal_ratio": None if temporal is None else {"ratio": temporal[0], "step": temporal[1]},
        "last_temporal_ratio": None if last_temporal is None else {"ratio": last_temporal[0], "step": last_temporal[1]},
        "last_global_norm": last["global_norm"] if last else None,
        "num_layers": len(layers.names) if layers is not None else len(last["layers"] if last else {}),
        **judged,
        "dead_units": {name: f for name, f in monitor.dead_units.items() if f >= DEAD_UNITS_FRACTION},
        "shared_parameters": dict(monitor.shared_parameters),
        "never_gradient_layers": layers_without(monitor.gradient_layers) if monitor.steps else [],
        "zero_lr_layers": [] if monitor.learning_layers is None else layers_without(monitor.learning_layers),
        "largest_update_to_weight": largest_update(history),
        "alerts": list(monitor.alerts),
        "stopped_by": monitor.stopped_by,
    }
