"""Device-side counters of gradient events between two logging steps.

The fields of `DeviceCounters` are the schema: they drive creation, reset, the single host read of a
logging step and the checkpoint, so a new counter is one new field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from stabilize.health.records import NonFiniteEvent, SpikeEvent

_NO_STEP = -1


def _spec(
    initial: float = 0, dtype: torch.dtype = torch.long, per_layer: bool = False, running: bool = False
) -> dict[str, Any]:
    """``running``: state that spans logging steps (read and checkpointed like the rest, never reset)."""
    return {"initial": initial, "dtype": dtype, "per_layer": per_layer, "running": running}


@dataclass
class DeviceCounters:
    """What happened on the device since the last read: counts, first/last step of each event kind, peaks."""

    #: Steps above ``exploding_factor`` x the running median (after the warm-up), or above the absolute ceiling.
    spikes: Tensor = field(metadata=_spec())
    spike_first: Tensor = field(metadata=_spec(_NO_STEP))
    spike_last: Tensor = field(metadata=_spec(_NO_STEP))
    spike_max_norm: Tensor = field(metadata=_spec(0.0, torch.float32))
    #: Largest ``norm / running median`` of a spike, and its step (the first such step: what the verdict names, the
    #: same at any logging cadence; -1 while no spike had a ratio).
    spike_max_ratio: Tensor = field(metadata=_spec(0.0, torch.float32))
    spike_peak_step: Tensor = field(metadata=_spec(_NO_STEP))
    #: Longest run of consecutive spikes that ended or goes on in this interval.
    spike_longest_run: Tensor = field(metadata=_spec())
    #: Spikes that were at least ``spike_persistence`` steps into a run of spikes.
    persistent_spikes: Tensor = field(metadata=_spec())
    #: Steps out of range: above ``gradient_to_loss_ceiling`` x the loss, or above ``exploding_threshold``.
    ceiling_steps: Tensor = field(metadata=_spec())
    #: Out-of-range steps at least ``CEILING_PERSISTENCE`` steps into a run of them.
    persistent_ceiling: Tensor = field(metadata=_spec())
    #: Largest finite total norm of the interval (the logged step's norm is one sample of it).
    max_norm: Tensor = field(metadata=_spec(0.0, torch.float32))
    #: Sum and count of the training losses handed to the monitor (their mean is the interval's loss).
    loss_sum: Tensor = field(metadata=_spec(0.0, torch.float32))
    loss_count: Tensor = field(metadata=_spec())
    nonfinite_tensors: Tensor = field(metadata=_spec())
    nonfinite_first: Tensor = field(metadata=_spec(_NO_STEP))
    nonfinite_last: Tensor = field(metadata=_spec(_NO_STEP))
    amp_skipped: Tensor = field(metadata=_spec())
    #: Non-finite gradient tensors per layer.
    layer_nonfinite: Tensor = field(metadata=_spec(0.0, torch.float32, per_layer=True))
    #: Length of the current run of consecutive spikes, and of out-of-range steps.
    spike_run: Tensor = field(metadata=_spec(running=True))
    ceiling_run: Tensor = field(metadata=_spec(running=True))
    #: ``|loss|`` of the first step that had one (-1 before), the reference of ``CEILING_LOSS_FLOOR``.
    first_loss: Tensor = field(metadata=_spec(-1.0, torch.float32, running=True))

    @classmethod
    def zeros(cls, num_layers: int, device: torch.device) -> DeviceCounters:
        values = {}
        for spec in fields(cls):
            shape = (num_layers,) if spec.metadata["per_layer"] else ()
            values[spec.name] = torch.full(shape, spec.metadata["initial"], dtype=spec.metadata["dtype"], device=device)
        return cls(**values)

    def reset(self) -> None:
        """Start a new interval (running state carries on)."""
        for spec in fields(self):
            if not spec.metadata["running"]:
                getattr(self, spec.name).fill_(spec.metadata["initial"])

    def pack(self) -> Tensor:
        """All counters as one float vector, in field order, to travel to the host with other values."""
        return torch.cat([getattr(self, spec.name).float().reshape(-1) for spec in fields(self)])

    def sizes(self) -> list[int]:
        return [getattr(self, spec.name).numel() for spec in fields(self)]

    def unpack(self, values: list[float]) -> dict[str, Any]:
        """Host values of `pack`'s vector: ints for integer counters, floats, lists for per-layer ones."""
        result: dict[str, Any] = {}
        start = 0
        for spec, size in zip(fields(self), self.sizes()):
            chunk = values[start : start + size]
            start += size
            if spec.metadata["dtype"] == torch.long:
                chunk = [int(v) for v in chunk]
            result[spec.name] = chunk if spec.metadata["per_layer"] else chunk[0]
        return result

    def load(self, values: dict[str, Any]) -> None:
        """Set the counters from host values (a checkpoint); per-layer values of another layer count and counters
        the checkpoint does not have (an older version's) are left at their initial values."""
        for spec in fields(self):
            if spec.name not in values:
                continue
            target = getattr(self, spec.name)
            value = torch.as_tensor(values[spec.name], dtype=target.dtype)
            if value.shape == target.shape:
                target.copy_(value)

    @property
    def device(self) -> torch.device:
        return self.spikes.device


def counter_events(
    counters: dict[str, Any], record_step: int, layer_names: list[str]
) -> tuple[SpikeEvent | None, NonFiniteEvent | None]:
    """The spike event and the non-finite event the host values of the counters (`DeviceCounters.unpack`) hold
    (None where the interval had none); ``record_step``: the step they are read at."""
    spike: SpikeEvent | None = None
    if counters["spikes"]:
        spike = {
            "first_step": counters["spike_first"],
            "last_step": counters["spike_last"],
            "steps": counters["spikes"],
            "max_norm": counters["spike_max_norm"],
            "peak_ratio": counters["spike_max_ratio"],
            "peak_step": counters["spike_peak_step"],
            "longest_run": counters["spike_longest_run"],
            "persistent_steps": counters["persistent_spikes"],
            "ceiling_steps": counters["ceiling_steps"],
            "persistent_ceiling": counters["persistent_ceiling"],
            "record_step": record_step,
        }
    nonfinite: NonFiniteEvent | None = None
    if counters["nonfinite_tensors"]:
        nonfinite = {
            "first_step": counters["nonfinite_first"],
            "last_step": counters["nonfinite_last"],
            "tensors": counters["nonfinite_tensors"],
            "layers": [layer_names[i] for i, v in enumerate(counters["layer_nonfinite"]) if v > 0],
        }
    return spike, nonfinite
