"""Device-side counters of gradient events between two logging steps.

The fields of :class:`DeviceCounters` are the schema: they drive creation, reset, the single host read of a
logging step and the checkpoint, so a new counter is one new field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

_NO_STEP = -1


def _spec(initial: float = 0, dtype: torch.dtype = torch.long, per_layer: bool = False) -> dict[str, Any]:
    return {"initial": initial, "dtype": dtype, "per_layer": per_layer}


@dataclass
class DeviceCounters:
    """What happened on the device since the last read: counts, first/last step of each event kind, peaks."""

    exploding: Tensor = field(metadata=_spec())
    exploding_first: Tensor = field(metadata=_spec(_NO_STEP))
    exploding_last: Tensor = field(metadata=_spec(_NO_STEP))
    exploding_max: Tensor = field(metadata=_spec(0.0, torch.float32))
    nonfinite_tensors: Tensor = field(metadata=_spec())
    nonfinite_first: Tensor = field(metadata=_spec(_NO_STEP))
    nonfinite_last: Tensor = field(metadata=_spec(_NO_STEP))
    amp_skipped: Tensor = field(metadata=_spec())
    #: Non-finite gradient tensors per layer.
    layer_nonfinite: Tensor = field(metadata=_spec(0.0, torch.float32, per_layer=True))

    @classmethod
    def zeros(cls, num_layers: int, device: torch.device) -> DeviceCounters:
        values = {}
        for spec in fields(cls):
            shape = (num_layers,) if spec.metadata["per_layer"] else ()
            values[spec.name] = torch.full(shape, spec.metadata["initial"], dtype=spec.metadata["dtype"], device=device)
        return cls(**values)

    def reset(self) -> None:
        for spec in fields(self):
            getattr(self, spec.name).fill_(spec.metadata["initial"])

    def pack(self) -> Tensor:
        """All counters as one float vector, in field order, to travel to the host with other values."""
        return torch.cat([getattr(self, spec.name).float().reshape(-1) for spec in fields(self)])

    def sizes(self) -> list[int]:
        return [getattr(self, spec.name).numel() for spec in fields(self)]

    def unpack(self, values: list[float]) -> dict[str, Any]:
        """Host values of :meth:`pack`'s vector: ints for integer counters, floats, lists for per-layer ones."""
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
        """Set the counters from host values (a checkpoint); per-layer values of another layer count are dropped."""
        for spec in fields(self):
            target = getattr(self, spec.name)
            value = torch.as_tensor(values[spec.name], dtype=target.dtype)
            if value.shape == target.shape:
                target.copy_(value)

    @property
    def device(self) -> torch.device:
        return self.exploding.device
