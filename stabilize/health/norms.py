"""L2 norms of many tensors at once: any precision, complex, sparse, and sharded across processes (FSDP2).

The common case, dense float32/16/bf16 tensors of one process, is one fused ``torch._foreach_norm``; the rest
costs only the models that need it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Dtypes whose norms one fused float32 kernel computes exactly enough.
_FUSED_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)


def foreach_norms(tensors: list[Tensor], fused: bool | None = None) -> Tensor:
    """The L2 norm of each tensor as one vector, in the tensors' own precision: float32 (half precision accumulated
    in float32), float64 as soon as one tensor is float64 or complex128. Complex tensors count their modulus, sparse
    ones their coalesced values. Plain float tensors take one fused kernel per device and dtype; ``fused`` says
    whether all tensors are such (``None``: look)."""
    if fused is None:
        fused = plain_floats(tensors)
    if fused:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    values = [stored_values(t) for t in tensors]
    wide = any(t.dtype in (torch.float64, torch.complex128) for t in values)
    result = torch.float64 if wide else torch.float32
    norms = torch._foreach_norm([t if t.dtype not in _FUSED_FLOAT32 else t.float() for t in values], 2)
    return torch.stack([norm.to(result) for norm in norms])


def plain_floats(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is dense float32, float16 or bfloat16 (the fused path of `foreach_norms`)."""
    return all(t.layout == torch.strided and t.dtype in _FUSED_FLOAT32 for t in tensors)


def stored_values(tensor: Tensor) -> Tensor:
    """The stored values of a sparse tensor (COO coalesced first: repeated indices add up), else the tensor itself."""
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce().values()
    if tensor.layout != torch.strided:
        return tensor.values()
    return tensor


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it where it is absent)."""
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def shard_groups(tensor: Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's local squared norm adds up to its global one: the mesh dimensions
    it is sharded on (replicated dimensions hold copies). ``()`` for a plain tensor."""
    if not is_dtensor(tensor):
        return ()
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(tensor.placements) if placement.is_shard())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class NormPlan:
    """How to take the norms of one list of tensors: whether the fused kernel applies, and which positions to sum
    over which process groups (FSDP2 shards: the squared norms of the local shards are all-reduced as one small
    tensor per group, as FSDP's own ``clip_grad_norm_`` does; every process must then take the same norms)."""

    fused: bool
    #: ``(process groups, positions)``: the tensors at ``positions`` are sharded over those groups.
    shards: tuple[tuple[tuple[Any, ...], tuple[int, ...]], ...] = ()

    @classmethod
    def of(cls, tensors: list[Tensor]) -> NormPlan:
        by_groups: dict[tuple[Any, ...], list[int]] = {}
        for position, tensor in enumerate(tensors):
            groups = shard_groups(tensor)
            if groups:
                by_groups.setdefault(groups, []).append(position)
        local = [_local(t) for t in tensors]
        return cls(plain_floats(local), tuple((groups, tuple(p)) for groups, p in by_groups.items()))

    def norms(self, tensors: list[Tensor]) -> Tensor:
        if not self.shards:
            return foreach_norms(tensors, self.fused)
        squares = foreach_norms([_local(t) for t in tensors], self.fused).square()
        for groups, positions in self.shards:
            whole = len(positions) == len(tensors)
            index = None if whole else torch.tensor(positions, device=squares.device)
            part = squares if index is None else squares.index_select(0, index)
            for group in groups:
                dist.all_reduce(part, group=group)
            if index is not None:
                squares = squares.index_copy(0, index, part)
        return squares.sqrt()


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
