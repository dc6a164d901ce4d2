"""The public records of gradient health: what ``history``, ``summary()`` and ``save_json`` return."""

from __future__ import annotations

import math
from typing import Any, TypedDict

from typing_extensions import NotRequired


class LayerStats(TypedDict):
    """One layer at one logging step."""

    grad_norm: float
    weight_norm: float
    #: ``||w_after - w_before|| / ||w_before||`` across the optimizer step (``track_update_ratio``).
    update_to_weight: NotRequired[float]


class StepRecord(TypedDict):
    """Everything measured at one logging step of one optimizer."""

    step: int
    global_norm: float
    median_norm: float
    depth_ratio: float
    min_layer_norm: float
    max_layer_norm: float
    vanishing_layers: list[str]
    #: Largest finite total norm since the previous logging step (this one included): the spikes between records.
    max_norm: float
    #: Mean training loss handed to the monitor since the previous logging step (NaN when none was).
    loss: float
    #: Events counted on the device since the previous logging step (this one included): spikes, and the spikes
    #: that were part of a persistent run of spikes or of out-of-range steps.
    spike_steps: int
    exploding_steps: int
    nonfinite_tensors: int
    amp_skipped: int
    #: Layers in forward order.
    layers: dict[str, LayerStats]
    #: Gradient norm at each time step of a recurrent model's ``recurrent_states`` (t = 0 first).
    temporal_grad_norms: NotRequired[list[float]]
    #: ``temporal_grad_norms[0] / temporal_grad_norms[-1]``.
    temporal_ratio: NotRequired[float]


class LossPoint(TypedDict):
    """What the loss and collapse rules read of a run at one step: a logging step's `StepRecord`, or a point
    of the per-step trace (`TracePoint`)."""

    step: int
    loss: float
    global_norm: float


class SpikeEvent(TypedDict):
    """Spikes (steps far above the running median) counted between two logging steps."""

    first_step: int
    last_step: int
    steps: int
    max_norm: float
    #: Largest ``norm / running median`` among them, and the first step that had it (-1: none had a ratio).
    peak_ratio: float
    peak_step: NotRequired[int]
    #: Longest run of consecutive spikes.
    longest_run: int
    #: Spikes at least ``spike_persistence`` steps into a run.
    persistent_steps: int
    #: Steps out of range (above ``gradient_to_loss_ceiling`` x the loss or above ``exploding_threshold``), and
    #: those at least ``CEILING_PERSISTENCE`` steps into a run of them.
    ceiling_steps: int
    persistent_ceiling: int
    #: The logging step that read them.
    record_step: int


class ExplosionEvent(TypedDict):
    """Spikes with evidence that the gradient was out of control; ``rule`` says which evidence."""

    first_step: int
    last_step: int
    steps: int
    max_norm: float
    peak_ratio: float
    #: ``"persistent"`` (a run of spikes), ``"loss"`` (the loss never came back below its level before),
    #: ``"nonfinite"`` (non-finite gradients followed) or ``"ceiling"`` (out of range for consecutive steps).
    rule: str


class NonFiniteEvent(TypedDict):
    """Non-finite gradient tensors counted between two logging steps."""

    first_step: int
    last_step: int
    tensors: int
    layers: list[str]


class DepthRatio(TypedDict):
    ratio: float
    step: int


class GradientCollapse(TypedDict):
    """How far a run's gradient fell: from ``from_norm`` (median of the records around ``from_step``) to
    ``to_norm`` (median of the latest records), below the collapse threshold since ``since_step``."""

    factor: float
    from_norm: float
    from_step: int
    to_norm: float
    since_step: int


class LossStall(TypedDict):
    """A training loss that stopped falling: ``level`` (median of the records from 5% to 10% of the run, from
    ``since_step``) against ``start_loss`` (the first records) and ``end_loss`` (the last tenth)."""

    since_step: int
    start_loss: float
    level: float
    end_loss: float


class LossBlowup(TypedDict):
    """The training loss far above its start or best (see `stabilize.health.instability`): from
    ``onset_step`` (its smoothed loss above the bar) to ``back_step`` (back below it; ``None``: still above at the
    end), its peak, and whether the run ``recovered`` (``end_loss``, the last tenth's, back near ``best_before`` and
    below ``start_loss``). ``confirmed_step``: where the evidence was enough for an alert (``None``: never)."""

    onset_step: int
    peak_step: int
    peak_loss: float
    start_loss: float
    best_before: float
    back_step: int | None
    end_loss: float
    recovered: bool
    confirmed_step: int | None


class UpdateRatio(TypedDict):
    """The largest ``||w_after - w_before|| / ||w_before||`` of a layer at a logging step."""

    ratio: float
    layer: str
    step: int


def largest_update(history: list[StepRecord]) -> UpdateRatio | None:
    """The largest update-to-weight ratio of any layer at any record (``track_update_ratio``), or ``None``."""
    best: UpdateRatio | None = None
    for record in history:
        for name, stats in record["layers"].items():
            ratio = stats.get("update_to_weight", math.nan)
            if math.isfinite(ratio) and (best is None or ratio > best["ratio"]):
                best = {"ratio": ratio, "layer": name, "step": record["step"]}
    return best


class Alert(TypedDict):
    """A finding confirmed while training ran: its ``kind`` (a verdict class), the step it was raised at and the
    evidence in words."""

    kind: str
    step: int
    evidence: str


class HealthSummary(TypedDict):
    """One optimizer's gradient health over the whole run: what the diagnosis says, as data."""

    steps: int
    logged_steps: int
    #: Layer name -> the step since which it has been vanishing without interruption.
    vanishing_layers_now: dict[str, int]
    #: Layer name -> the first step it was ever vanishing.
    ever_vanished: dict[str, int]
    explosions: list[ExplosionEvent]
    #: Spikes without evidence of harm, which training shrugged off.
    transient_spikes: list[SpikeEvent]
    nonfinite: list[NonFiniteEvent]
    skipped_steps: list[int]
    amp_skipped_steps: int
    worst_depth_ratio: DepthRatio | None
    #: Smallest gradient ratio between the first and the last time step (recurrent models).
    worst_temporal_ratio: DepthRatio | None
    #: The same ratio at the last record that had one (recurrent models).
    last_temporal_ratio: DepthRatio | None
    last_global_norm: float | None
    num_layers: int
    #: The run's total gradient norm fell ``collapse_factor`` below its earlier level (runs without explosions).
    gradient_collapse: GradientCollapse | None
    #: The training loss stalled near its start (single-optimizer runs; see `stabilize.health.stall`).
    loss_stall: NotRequired[LossStall | None]
    #: The training loss's blow-ups, recovered or not (single-optimizer runs; see
    #: `stabilize.health.instability`).
    loss_blowups: NotRequired[list[LossBlowup]]
    #: How far the training loss fell over the run, ``1 - end / start`` (single-optimizer runs; see
    #: `stabilize.health.stall.loss_progress`).
    loss_progress: NotRequired[float | None]
    #: The largest per-layer update-to-weight ratio at a logging step (``track_update_ratio``).
    largest_update_to_weight: NotRequired[UpdateRatio | None]
    #: Findings confirmed during training, in the order they were raised (``GradientHealthCallback``'s alerts).
    alerts: NotRequired[list[Alert]]
    #: ReLU-like modules with at least half their channels dead at the last record (``track_activations``).
    dead_units: NotRequired[dict[str, float]]
    #: Tied weights: a parameter's name -> the other names it has (counted once, under the first).
    shared_parameters: NotRequired[dict[str, list[str]]]
    #: Layers the optimizer holds that never received a gradient (not used by the loss), in forward order.
    never_gradient_layers: NotRequired[list[str]]
    #: Layers whose learning rate was 0 at every record (frozen by their parameter group), in forward order.
    zero_lr_layers: NotRequired[list[str]]
    #: The class name of the exception that stopped training: the summary covers the steps before it.
    stopped_by: NotRequired[str | None]


def record_metrics(record: StepRecord, prefix: str = "") -> dict[str, float]:
    """The scalars logged for one record (the keys of ``GradientHealthCallback``'s table)."""
    metrics = {
        f"grad_health/{prefix}global_norm": record["global_norm"],
        f"grad_health/{prefix}global_norm_max": record["max_norm"],
        f"grad_health/{prefix}min_layer_norm": record["min_layer_norm"],
        f"grad_health/{prefix}max_layer_norm": record["max_layer_norm"],
        f"grad_health/{prefix}depth_ratio": record["depth_ratio"],
        f"grad_health/{prefix}vanishing_layers": float(len(record["vanishing_layers"])),
        f"grad_health/{prefix}spikes": float(record["spike_steps"]),
        f"grad_health/{prefix}exploding": float(record["exploding_steps"]),
        f"grad_health/{prefix}nonfinite": float(record["nonfinite_tensors"]),
        f"grad_health/{prefix}amp_skipped": float(record["amp_skipped"]),
    }
    if "temporal_ratio" in record:
        metrics[f"grad_health/{prefix}temporal_ratio"] = record["temporal_ratio"]
    for name, stats in record["layers"].items():
        metrics[f"grad_norm/{prefix}{name}"] = stats["grad_norm"]
        if stats["weight_norm"] > 0:
            metrics[f"grad_to_weight/{prefix}{name}"] = stats["grad_norm"] / stats["weight_norm"]
    return metrics


def jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become null (JSON has no NaN/Inf), tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
