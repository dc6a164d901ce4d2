"""What a `GradientMonitor` checkpoints: its host records, so that a resumed run continues the same statistics.

The checkpointed fields are the monitor's public dataclass fields but those in `NOT_CHECKPOINTED`; the monitor adds
its recent norms and its device counters in host form (`GradientMonitor.state_dict`).
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from stabilize.health.trace import StepTrace

if TYPE_CHECKING:
    from stabilize.health.monitor import GradientMonitor

#: Public fields a checkpoint does not hold: settings given anew, the layers of the new fit, device state (saved as
#: ``counters`` in host form), and the exception that stopped the previous fit.
NOT_CHECKPOINTED = frozenset({"criteria", "layers", "counters", "stopped_by"})


def checkpointed(name: str) -> bool:
    return not name.startswith("_") and name not in NOT_CHECKPOINTED


def checkpointed_fields(monitor: GradientMonitor) -> dict[str, Any]:
    """The monitor's host records as checkpoint values (sets as sorted lists) and its step trace."""
    # Copies: a checkpoint written in the background (AsyncCheckpointIO) must not see the records grow meanwhile.
    state = copy.deepcopy({f.name: getattr(monitor, f.name) for f in fields(monitor) if checkpointed(f.name)})
    state["gradient_layers"] = sorted(monitor.gradient_layers)
    state["learning_layers"] = None if monitor.learning_layers is None else sorted(monitor.learning_layers)
    return {**state, "trace": monitor._trace.state_dict()}


def restored_fields(cls: type[GradientMonitor], state: dict[str, Any]) -> dict[str, Any]:
    """The field values of a monitor restored from ``state`` (`GradientMonitor.state_dict`'s): a key an older
    checkpoint lacks keeps its field's default (keys it has that are gone, such as the ``explosions`` of the rule
    before the spike rules, are not carried)."""
    # Copies: the restored monitor must not append to the lists of a state that another monitor still holds.
    saved = copy.deepcopy({f.name: state[f.name] for f in fields(cls) if checkpointed(f.name) and f.name in state})
    for name in ("worst_depth_ratio", "worst_temporal_ratio", "last_temporal_ratio"):
        pair = saved.get(name)
        saved[name] = (pair[0], pair[1]) if pair else None
    for name in ("gradient_layers", "learning_layers"):
        if saved.get(name) is not None:
            saved[name] = set(saved[name])
    return {
        **saved,
        "_saved_norms": list(state["norm_history"]),
        "_saved_counters": state.get("counters"),
        "_trace": StepTrace.from_state_dict(state["trace"]) if "trace" in state else StepTrace(),
    }
