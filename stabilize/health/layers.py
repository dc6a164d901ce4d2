"""Layers as gradient statistics see them: the modules that directly own parameters, in forward order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def parameter_owners(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every module that directly owns a parameter, in registration order."""
    for name, child in module.named_modules():
        if any(True for _ in child.parameters(recurse=False)):
            yield name, child


@dataclass
class LayerIndex:
    """The layers one optimizer updates and which parameter belongs to which layer.

    Args:
        names: Layer names in forward order (``"(root)"`` for parameters owned by the module itself).
        params: The trainable parameters, grouped by layer.
        layer_of_param: For each parameter, the index of its layer in ``names``.
    """

    names: list[str]
    params: list[Tensor]
    layer_of_param: list[int]
    _index_cache: dict[tuple[object, ...], Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, module: nn.Module, optimized: Iterable[Tensor], forward_order: Mapping[str, int] | None = None
    ) -> LayerIndex:
        """Index the parameters of ``module`` that are in ``optimized``.

        Layers are sorted by ``forward_order`` (the position at which the forward pass first used each module);
        modules it does not name follow, in registration order.
        """
        in_optimizer = {id(p) for p in optimized}
        owners = [
            (name, child)
            for name, child in parameter_owners(module)
            if any(id(p) in in_optimizer for p in child.parameters(recurse=False))
        ]
        registration = {name: i for i, (name, _) in enumerate(owners)}
        order = forward_order or {}
        owners.sort(key=lambda item: (item[0] not in order, order.get(item[0], registration[item[0]])))
        names: list[str] = []
        params: list[Tensor] = []
        layer_of_param: list[int] = []
        for layer, (name, child) in enumerate(owners):
            names.append(name or "(root)")
            for param in child.parameters(recurse=False):
                if id(param) in in_optimizer and param.requires_grad:
                    params.append(param)
                    layer_of_param.append(layer)
        return cls(names, params, layer_of_param)

    def __len__(self) -> int:
        return len(self.names)

    def with_gradient(self) -> tuple[int, ...]:
        """Positions (in ``params``) of the parameters that have a gradient now."""
        return tuple(i for i, p in enumerate(self.params) if p.grad is not None)

    def gradients(self, positions: tuple[int, ...]) -> list[Tensor]:
        """The gradients of the parameters at ``positions`` (all of which have one, see :meth:`with_gradient`)."""
        grads = [self.params[i].grad for i in positions]
        return [g for g in grads if g is not None]

    def layer_index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """Layer of each listed parameter, as a device tensor cached per parameter subset (no per-step copy)."""
        key = (*positions, str(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor([self.layer_of_param[p] for p in positions], device=device)
        return self._index_cache[key]

    def per_layer_norms(self, positions: tuple[int, ...], norms: Tensor) -> Tensor:
        """Combine the L2 norms of the listed parameters into one L2 norm per layer (0 for absent layers)."""
        index = self.layer_index(positions, norms.device)
        return torch.zeros(len(self.names), device=norms.device).index_add_(0, index, norms.square()).sqrt()

    def present(self, positions: tuple[int, ...]) -> list[int]:
        """The layers the listed parameters belong to, in forward order."""
        return sorted({self.layer_of_param[p] for p in positions})

    def names_of(self, positions: Iterable[int]) -> list[str]:
        """Names of the layers owning the parameters at ``positions``, once each, in forward order."""
        return [self.names[layer] for layer in sorted({self.layer_of_param[p] for p in positions})]


def foreach_norms(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of each tensor, in float32, as one vector (one fused kernel per device and dtype)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


class ForwardOrder:
    """The order in which a forward pass first uses each parameter-owning module (``name -> position``).

    Hooks are attached by :meth:`watch` and removed by :meth:`stop`; one training pass is enough.
    """

    def __init__(self, order: Mapping[str, int] | None = None) -> None:
        self.order: dict[str, int] = dict(order or {})
        self._hooks: list[RemovableHandle] = []

    def watch(self, module: nn.Module) -> None:
        for name, child in parameter_owners(module):
            self._hooks.append(child.register_forward_pre_hook(self._hook(name)))

    def stop(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def record(module: nn.Module, args: Any) -> None:
            self.order.setdefault(name, len(self.order))

        return record
