"""Gradient health of one optimizer's parameters, in plain torch: no Trainer, no logger.

`GradientMonitor` is the maths behind `GradientHealthCallback`, usable in a
raw PyTorch loop:

```python
monitor = GradientMonitor(HealthCriteria())
monitor.attach(LayerIndex.build(model, model.parameters()))
for step, batch in enumerate(loader):
    loss(model, batch).backward()
    observation = monitor.observe(step, loss=loss)  # device ops only, no host sync
    if step % 10 == 0:
        record, _ = monitor.record(step, observation)  # one host transfer
    optimizer.step(); optimizer.zero_grad()
monitor.flush()
print(monitor.summary())
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from stabilize.health.alerts import confirmed_findings
from stabilize.health.counters import DeviceCounters, counter_events
from stabilize.health.criteria import HealthCriteria
from stabilize.health.layers import LayerIndex
from stabilize.health.monitor_state import checkpointed_fields, restored_fields
from stabilize.health.pending import Observation, PendingSteps
from stabilize.health.records import (
    Alert,
    HealthSummary,
    NonFiniteEvent,
    SpikeEvent,
    StepRecord,
)
from stabilize.health.spike_counting import count_chunk
from stabilize.health.summary import run_summary
from stabilize.health.trace import StepTrace

#: Steps counted together on the device (see `stabilize.health.spike_counting`); a logging step or any read of
#: the counters counts the steps gathered so far.
CHUNK_STEPS = 64


@dataclass
class GradientMonitor:
    """Running gradient statistics of one optimizer: device counters between reads, host records after them.

    Args:
        criteria: The vanishing/exploding thresholds.
        prefix: Key segment of this optimizer in logged names (``""`` with one optimizer).
    """

    criteria: HealthCriteria = field(default_factory=HealthCriteria)
    prefix: str = ""
    layers: LayerIndex | None = None
    # Host records (checkpointed).
    history: list[StepRecord] = field(default_factory=list)
    vanishing_since: dict[str, int] = field(default_factory=dict)
    first_vanished: dict[str, int] = field(default_factory=dict)
    spikes: list[SpikeEvent] = field(default_factory=list)
    nonfinite: list[NonFiniteEvent] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    amp_skipped: int = 0
    worst_depth_ratio: tuple[float, int] | None = None
    worst_temporal_ratio: tuple[float, int] | None = None
    last_temporal_ratio: tuple[float, int] | None = None
    #: Dead-channel fraction of each ReLU-like module at the last record that measured activations.
    dead_units: dict[str, float] = field(default_factory=dict)
    #: Whether ``worst_depth_ratio`` comes from the warm-up (then the first judged record replaces it).
    worst_depth_in_warmup: bool = False
    #: Tied weights, counted once (see `LayerIndex.shared`).
    shared_parameters: dict[str, list[str]] = field(default_factory=dict)
    #: Layers that had a gradient at some observed step; layers that had a non-zero learning rate at some record
    #: (``None`` until `note_learning_rates` is first called: not tracked).
    gradient_layers: set[str] = field(default_factory=set)
    learning_layers: set[str] | None = None
    #: Findings confirmed during training (see `new_alerts`), in order.
    alerts: list[Alert] = field(default_factory=list)
    #: The exception that stopped training (its class name), when one did: the summary is then partial.
    stopped_by: str | None = None
    steps: int = 0
    last_step: int = -1
    # Device state between logging steps, and its host copy while no device state exists (checkpoint, new fit).
    counters: DeviceCounters | None = None
    #: The finite total norms of the last ``median_window`` counted steps, oldest first (NaN where none).
    _window: Tensor | None = None
    #: Steps observed since the window was filled from a checkpoint (the relative rule's warm-up counts them).
    _window_position: int = 0
    _last_median: Tensor | None = None
    #: Steps observed but not yet counted, and counted ones not yet read into the trace (see `PendingSteps`).
    _pending: PendingSteps = field(default_factory=PendingSteps)
    _saved_norms: list[float] = field(default_factory=list)
    _saved_counters: dict[str, Any] | None = None
    _pending_update: tuple[int, tuple[int, ...], list[Tensor], Tensor] | None = None
    _positions_seen: tuple[int, ...] = ()
    #: Every counted step's loss and total norm on the host (checkpointed as ``trace``).
    _trace: StepTrace = field(default_factory=StepTrace)
    #: Observed steps at the last alert check (the rules read the whole trace, so they run every few steps).
    _alerts_checked_at: int = -(10**9)

    def attach(self, layers: LayerIndex) -> None:
        """Watch these layers from now on (a new fit brings new parameters); records and recent norms stay."""
        self.detach()
        self.layers = layers
        self.shared_parameters = dict(layers.shared)
        self._positions_seen = ()

    def detach(self) -> None:
        """Move the device state to the host (one read) and forget the layers."""
        if self.counters is not None:
            self._read_trace()
            self._saved_counters = self.counters.unpack(self.counters.pack().tolist())
        self._saved_norms = self.recent_norms()
        self.counters, self._window, self._pending_update, self.layers = None, None, None, None

    # ---------------------------------------------------------------------------------------------- every step
    def observe(
        self, step: int, grad_scale: Tensor | None = None, amp: bool = False, loss: Tensor | None = None
    ) -> Observation | None:
        """Count this step's events on the device; no host transfer. ``None`` when no parameter has a gradient.

        Args:
            step: The step number recorded in events.
            grad_scale: Divide the gradient norms by this (gradients still scaled by a GradScaler).
            amp: Whether a GradScaler owns non-finite steps (counted as ``amp_skipped``, never as events).
            loss: The training loss whose backward made these gradients (an unscaled device scalar; with gradient
                accumulation their sum): the explosion rules ask whether a spike hurt training.
        """
        layers = self._layers()
        positions = layers.with_gradient()
        if not positions:
            return None
        if positions != self._positions_seen:  # a tuple comparison per step; names only when the set changes
            self._positions_seen = positions
            self.gradient_layers.update(layers.names_of(positions))
        norms = layers.gradient_norms(positions)
        if grad_scale is not None:
            norms = norms / grad_scale.to(norms.device)
        self._counters(norms.device)
        # A chunk holds steps of one parameter subset and one AMP mode; counted when full.
        pending = self._pending
        if pending.norms and (len(pending.norms) >= CHUNK_STEPS or pending.key != (positions, amp)):
            self._count_chunk()
        pending.add(step, norms, loss, (positions, amp))
        self._window_position += 1
        self.steps += 1
        self.last_step = step
        return Observation(positions, norms)

    def _count_chunk(self) -> None:
        """Count the steps observed since the last count into the device counters (device ops only)."""
        pending = self._pending
        if not pending.norms:
            return
        counters, window = self.counters, self._window
        assert counters is not None and window is not None
        device = counters.device
        first_position = self._window_position - len(pending.norms)  # the window position of the chunk's first step
        chunk = pending.chunk(self.criteria.judged_after - first_position, device)
        self._window, medians, totals = count_chunk(
            self.criteria, counters, window, chunk, self._layers().layer_index(pending.key[0], device)
        )
        self._last_median = medians[-1]
        pending.counted(chunk, totals)

    def nonfinite_layers(self, observation: Observation) -> list[str]:
        """Layers with a non-finite gradient in ``observation``, in forward order (one host read)."""
        bad = torch.nonzero(observation.tensor_nonfinite).flatten().tolist()
        return self._layers().names_of(observation.positions[i] for i in bad)

    def skip(self, step: int) -> None:
        """Drop every gradient, so the optimizer changes no weight and no state, and remember the step."""
        for param in self._layers().params:
            param.grad = None
        self.skipped_steps.append(step)

    # -------------------------------------------------------------------------------------------- logging steps
    def record(
        self,
        step: int,
        observation: Observation,
        extras: Sequence[Tensor] = (),
        amp: bool = False,
        snapshot_weights: bool = False,
        temporal: Tensor | None = None,
    ) -> tuple[StepRecord | None, list[float]]:
        """Read the step's layer statistics, the counters and ``extras`` (scalars) in one host transfer.

        ``temporal``: the gradient norm at each time step of a recurrent layer's output (see
        `TemporalProbe`), read in the same transfer.

        Returns the record (``None`` for a step the GradScaler skipped: its overflowed norms say nothing about
        the model) and the host values of ``extras``.
        """
        self._count_chunk()
        layers = self._layers()
        positions = observation.positions
        params = [layers.params[i] for i in positions]
        layer_grad = layers.per_layer_norms(positions, observation.norms)
        layer_weight = layers.per_layer_norms(positions, layers.norms(params, ("weight", *positions)))
        if snapshot_weights:
            self._pending_update = (step, positions, [p.detach().clone() for p in params], layer_weight)
        counters = self.counters
        assert counters is not None
        device = layer_grad.device
        parts = [
            layer_grad,
            layer_weight,
            torch.stack([observation.total, self._median_now(device).to(observation.total.dtype)]),
            counters.pack(),
            temporal.to(device) if temporal is not None else torch.zeros(0, device=device),
            self._pending.unread_values(device),
            *[value.detach().float().to(device).reshape(1) for value in extras],
        ]
        values = torch.cat(parts).tolist()  # the one host transfer of a logging step
        grad_values, weight_values, (total, median), counter_values, temporal_values, trace_values, extra_values = (
            _split(values, [len(part) for part in parts[:6]])
        )
        self._extend_trace(trace_values)
        if amp and not math.isfinite(total):
            # The counters stay on the device for the next record; this step's numbers are overflow, not data.
            self._pending_update = None
            return None, extra_values
        counter_dict = counters.unpack(counter_values)
        exploding, nonfinite, amp_skipped = self._apply_counters(counter_dict, step)
        counters.reset()
        present = layers.present(positions)
        finite_norms = [grad_values[i] for i in present if math.isfinite(grad_values[i])]
        largest = max(finite_norms, default=0.0)
        loss_count = counter_dict["loss_count"]
        loss = counter_dict["loss_sum"] / loss_count if loss_count else math.nan
        floor = self.criteria.vanishing_floor(largest, converged=self._loss_fell(loss))
        vanishing = [layers.names[i] for i in present if math.isfinite(grad_values[i]) and grad_values[i] < floor]
        first_norm, last_norm = grad_values[present[0]], grad_values[present[-1]]
        depth_ratio = first_norm / last_norm if last_norm > 0 else math.inf
        # A layer whose gradient is zero during the warm-up by design (the partner of a zero-initialised adapter) is
        # no finding; a record of the warm-up is the worst depth ratio only until a judged record comes.
        in_warmup = self.steps <= self.criteria.warmup_steps
        self._update_vanishing(vanishing, step, in_warmup)
        if math.isfinite(depth_ratio) and (
            self.worst_depth_ratio is None
            or (self.worst_depth_in_warmup and not in_warmup)
            or depth_ratio < self.worst_depth_ratio[0]
        ):
            self.worst_depth_ratio = (depth_ratio, step)
            self.worst_depth_in_warmup = in_warmup
        record: StepRecord = {
            "step": step,
            "global_norm": total,
            "median_norm": median,
            "depth_ratio": depth_ratio,
            "min_layer_norm": min(finite_norms, default=math.nan),
            "max_layer_norm": largest,
            "vanishing_layers": vanishing,
            "max_norm": max(counter_dict["max_norm"], total) if math.isfinite(total) else counter_dict["max_norm"],
            "loss": loss,
            "spike_steps": counter_dict["spikes"],
            "exploding_steps": exploding,
            "nonfinite_tensors": nonfinite,
            "amp_skipped": amp_skipped,
            "layers": {
                layers.names[i]: {"grad_norm": grad_values[i], "weight_norm": weight_values[i]} for i in present
            },
        }
        # An exactly zero gradient at t = 0 means the loss does not read that step of this tensor at all (the output
        # sequence of nn.RNN/LSTM read at the last step only: its gradient never flows back through the recurrence
        # inside the layer), so the ratio measures nothing about credit over time and is left out.
        if temporal_values and temporal_values[0] != 0:
            first, last = temporal_values[0], temporal_values[-1]
            ratio = first / last if last > 0 else math.inf
            record["temporal_grad_norms"] = temporal_values
            record["temporal_ratio"] = ratio
            self.last_temporal_ratio = (ratio, step)
            if math.isfinite(ratio) and (self.worst_temporal_ratio is None or ratio < self.worst_temporal_ratio[0]):
                self.worst_temporal_ratio = (ratio, step)
        self.history.append(record)
        return record, extra_values

    def note_learning_rates(self, learning: set[int]) -> None:
        """Remember which layers had a non-zero learning rate now: ``learning`` holds the ``id`` of every parameter
        in a parameter group whose learning rate is not 0 (called on logging steps)."""
        layers = self._layers()
        self.learning_layers = self.learning_layers or set()
        self.learning_layers.update(layers.names_of(i for i, p in enumerate(layers.params) if id(p) in learning))

    def _loss_fell(self, loss: float) -> bool:
        """Whether the training loss, the records' and ``loss`` (this interval's), fell from its first record to now
        by more than half its range and half its starting magnitude (free of the loss's scale)."""
        losses = [r["loss"] for r in self.history if math.isfinite(r.get("loss", math.nan))]
        losses += [loss] if math.isfinite(loss) else []
        if len(losses) < 2:
            return False
        span, fall = max(losses) - min(losses), losses[0] - losses[-1]
        # Half the range and half the starting magnitude: noise around a constant loss is neither.
        return span > 0 and fall / span > 0.5 and fall > 0.5 * abs(losses[0])

    def update_ratios(self) -> tuple[int, dict[str, float]] | None:
        """After the optimizer stepped: ``||w_after - w_before|| / ||w_before||`` per layer of the snapshot taken by
        `record`, added to its record. ``None`` when there is no snapshot."""
        if self._pending_update is None or self.layers is None:
            return None
        step, positions, before, layer_weight = self._pending_update
        self._pending_update = None
        layers = self.layers
        with torch.no_grad():
            deltas = torch._foreach_sub([layers.params[i].detach() for i in positions], before)
        update_norms = layers.norms(list(deltas), ("update", *positions))
        ratios = (layers.per_layer_norms(positions, update_norms) / layer_weight).tolist()
        updates = {layers.names[i]: ratios[i] for i in layers.present(positions) if math.isfinite(ratios[i])}
        if self.history and self.history[-1]["step"] == step:
            for name, ratio in updates.items():
                self.history[-1]["layers"][name]["update_to_weight"] = ratio
        return step, updates

    def discard_snapshot(self) -> None:
        """Forget a weight snapshot whose step did not happen (the GradScaler skipped it)."""
        self._pending_update = None

    def flush(self) -> None:
        """Turn what the counters hold into events (one host read), e.g. at the end of training."""
        if self.counters is not None:
            self._count_chunk()
            self._apply_counters(self.counters.unpack(self.counters.pack().tolist()), self.last_step)
            self.counters.reset()
            self._read_trace()

    # ------------------------------------------------------------------------------------------- the step trace
    def _extend_trace(self, values: list[float]) -> None:
        """Append the host values of the pending steps' ``unread_values`` to the trace."""
        self._trace.extend(*self._pending.take_unread(values))

    def _read_trace(self) -> None:
        """Bring every counted step to the host trace (one host read, when any is on the device)."""
        if self.counters is not None:
            self._count_chunk()
        unread = self._pending.unread
        if unread:
            self._extend_trace(self._pending.unread_values(unread[0][1].device).tolist())

    def new_alerts(self, judge_loss: bool = True, final: bool = False) -> list[Alert]:
        """Findings confirmed since the last call (see `confirmed_findings`), also
        appended to `alerts`. Reads what has reached the host (call it after `record` or `flush`);
        the rules read the whole trace, so they run at most once every 16 observed steps or every 1/64 of the trace,
        whichever is longer, and always when ``final`` (the end of training). A finding once confirmed stays
        confirmed, so whether a run raises an alert does not depend on the logging cadence, only when."""
        if not final and self.steps - self._alerts_checked_at < max(16, len(self._trace) // 64):
            return []
        self._alerts_checked_at = self.steps
        raised = {alert["kind"] for alert in self.alerts}
        new = confirmed_findings(
            self._trace.points(), self.spikes, self.nonfinite, self.criteria, raised, self.last_step, judge_loss
        )
        self.alerts += new
        return new

    # ------------------------------------------------------------------------------------------------ results
    def summary(self, judge_loss: bool = True) -> HealthSummary:
        """The whole run as data (see `stabilize.health.summary.run_summary`). ``judge_loss=False`` leaves out the
        loss stall: with several optimizers each network's loss is measured against the other (a GAN
        discriminator's hovers by design) or is a part of the whole, so a flat one says nothing."""
        self._read_trace()
        return run_summary(self, self._trace.points(), judge_loss)

    def trace_points(self) -> list[dict[str, Any]]:
        """The per-step trace (see `StepTrace`) as points, e.g. for ``save_json``."""
        self._read_trace()
        return [dict(point) for point in self._trace.points()]

    def recent_norms(self) -> list[float]:
        """The finite total norms of the running-median window, oldest first (one host read)."""
        if self._window is None:
            return list(self._saved_norms)
        self._count_chunk()
        return [value for value in self._window.tolist() if math.isfinite(value)]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a resume, device counters included (one host read): see
        `stabilize.health.monitor_state`."""
        self._read_trace()
        counters = self.counters.unpack(self.counters.pack().tolist()) if self.counters else self._saved_counters
        return {**checkpointed_fields(self), "norm_history": self.recent_norms(), "counters": counters}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], criteria: HealthCriteria) -> GradientMonitor:
        """The monitor `state_dict` saved (see `stabilize.health.monitor_state`)."""
        return cls(criteria=criteria, **restored_fields(cls, state))

    # ------------------------------------------------------------------------------------------------ helpers
    def _layers(self) -> LayerIndex:
        if self.layers is None:
            raise RuntimeError("GradientMonitor.attach(layers) must be called before observing gradients.")
        return self.layers

    def _counters(self, device: torch.device) -> DeviceCounters:
        if self.counters is None or self.counters.device != device:
            self.counters = DeviceCounters.zeros(len(self._layers()), device)
            if self._saved_counters is not None:
                self.counters.load(self._saved_counters)
                self._saved_counters = None
            window_size = self.criteria.median_window
            recent = self._saved_norms[-window_size:]
            nans = [math.nan] * (window_size - len(recent))
            self._window = torch.tensor(nans + recent, dtype=torch.float32, device=device)
            self._window_position = len(recent)
        return self.counters

    def _median_now(self, device: torch.device) -> Tensor:
        """The running median the last counted step was judged against (NaN before any)."""
        if self._last_median is None:
            return torch.tensor(math.nan, device=device)
        return self._last_median

    def _apply_counters(self, counters: dict[str, Any], record_step: int) -> tuple[int, int, int]:
        """Record the events the counters hold; returns the persistent or above-ceiling spikes, non-finite tensors
        and AMP-skipped steps."""
        spike, nonfinite = counter_events(counters, record_step, self._layers().names)
        self.spikes += [spike] if spike else []
        self.nonfinite += [nonfinite] if nonfinite else []
        self.amp_skipped += counters["amp_skipped"]
        exploding = max(counters["persistent_spikes"], counters["persistent_ceiling"])
        return exploding, counters["nonfinite_tensors"], counters["amp_skipped"]

    def _update_vanishing(self, vanishing: list[str], step: int, in_warmup: bool) -> None:
        for name in vanishing:
            self.vanishing_since.setdefault(name, step)
            if not in_warmup:
                self.first_vanished.setdefault(name, step)
        for name in list(self.vanishing_since):
            if name not in vanishing:
                del self.vanishing_since[name]


def _split(values: list[float], sizes: list[int]) -> list[list[float]]:
    """Cut ``values`` into consecutive pieces of ``sizes``; the rest is the last piece."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(values[start : start + size])
        start += size
    return [*pieces, values[start:]]
