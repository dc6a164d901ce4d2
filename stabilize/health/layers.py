"""Layers as gradient statistics see them: the modules that directly own parameters, in forward order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from stabilize.health.norms import NormPlan, is_dtensor


def parameter_owners(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every module that directly owns a parameter, in registration order."""
    for name, child in module.named_modules():
        if any(True for _ in child.parameters(recurse=False)):
            yield name, child


def layer_name(qualified: str) -> str:
    """A module's name as keys show it: ``"(root)"`` for the module itself, and without the ``_orig_mod`` segment
    that ``torch.compile`` inserts, so a compiled submodule keeps the keys of the uncompiled one."""
    name = ".".join(part for part in qualified.split(".") if part != "_orig_mod")
    return name or "(root)"


def _sort_key(name: str, order: Mapping[str, int], registration: int) -> tuple[bool, float, int]:
    """Where a layer goes in forward order: its own first use; a module its parent uses functionally (never called,
    as ``nn.MultiheadAttention``'s ``out_proj``) right after what its nearest called ancestor's subtree used; a
    module with no called ancestor last, in registration order."""
    if name in order:
        return False, order[name], registration
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = ".".join(parts[:depth])
        if ancestor in order:
            inside = [v for k, v in order.items() if not ancestor or k == ancestor or k.startswith(ancestor + ".")]
            return False, max(inside) + 0.5, registration
    return True, registration, registration


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
    #: A parameter owned by several modules (tied weights), counted once under its first owner's name:
    #: ``{"embed.weight": ["lm_head.weight"]}``.
    shared: dict[str, list[str]] = field(default_factory=dict)
    _index_cache: dict[tuple[object, ...], Tensor] = field(default_factory=dict, repr=False)
    _plans: dict[tuple[object, ...], NormPlan] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, module: nn.Module, optimized: Iterable[Tensor], forward_order: Mapping[str, int] | None = None
    ) -> LayerIndex:
        """Index the parameters of ``module`` that are in ``optimized``, each once, under the first module (in
        registration order) that owns it.

        Layers are sorted by ``forward_order`` (the position at which the forward pass first used each module, see
        `ForwardOrder`); a module it does not name follows its nearest ancestor it names, other modules come
        last, in registration order.
        """
        in_optimizer = {id(p) for p in optimized}
        first_name: dict[int, str] = {}
        shared: dict[str, list[str]] = {}
        owned: list[tuple[str, list[Tensor]]] = []
        for name, child in parameter_owners(module):
            mine: list[Tensor] = []
            for local, param in child.named_parameters(recurse=False):
                qualified = f"{layer_name(name)}.{local}" if name else local
                if id(param) in first_name:
                    shared.setdefault(first_name[id(param)], []).append(qualified)
                    continue
                first_name[id(param)] = qualified
                if id(param) in in_optimizer and param.requires_grad:
                    mine.append(param)
            if mine:
                owned.append((name, mine))
        order = forward_order or {}
        ranked = sorted(range(len(owned)), key=lambda i: _sort_key(owned[i][0], order, i))
        names: list[str] = []
        params: list[Tensor] = []
        layer_of_param: list[int] = []
        for layer, i in enumerate(ranked):
            name, mine = owned[i]
            names.append(layer_name(name))
            params += mine
            layer_of_param += [layer] * len(mine)
        return cls(names, params, layer_of_param, shared)

    def __len__(self) -> int:
        return len(self.names)

    def with_gradient(self) -> tuple[int, ...]:
        """Positions (in ``params``) of the parameters that have a gradient now."""
        return tuple(i for i, p in enumerate(self.params) if p.grad is not None)

    def gradients(self, positions: tuple[int, ...]) -> list[Tensor]:
        """The gradients of the parameters at ``positions`` (all of which have one, see `with_gradient`)."""
        grads = [self.params[i].grad for i in positions]
        return [g for g in grads if g is not None]

    def gradient_norms(self, positions: tuple[int, ...]) -> Tensor:
        """The L2 norm of the gradient of each listed parameter (see `NormPlan`)."""
        return self.norms(self.gradients(positions), ("grad", *positions))

    def norms(self, tensors: list[Tensor], key: tuple[object, ...]) -> Tensor:
        """The L2 norm of each tensor, planned once per ``key`` (a parameter subset and what of it: gradients,
        weights, updates), since a parameter keeps its dtype, layout and sharding from step to step."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = NormPlan.of(tensors)
        return plan.norms(tensors)

    @cached_property
    def sharded(self) -> bool:
        """Whether the parameters are DTensors (FSDP2's ``fully_shard``): each process holds part of each."""
        return any(is_dtensor(p) for p in self.params)

    def layer_index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """Layer of each listed parameter, as a device tensor cached per parameter subset (no per-step copy)."""
        key = (*positions, str(device))
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor([self.layer_of_param[p] for p in positions], device=device)
        return self._index_cache[key]

    def per_layer_norms(self, positions: tuple[int, ...], norms: Tensor) -> Tensor:
        """Combine the L2 norms of the listed parameters into one L2 norm per layer (0 for absent layers)."""
        index = self.layer_index(positions, norms.device)
        zeros = torch.zeros(len(self.names), device=norms.device, dtype=norms.dtype)
        return zeros.index_add_(0, index, norms.square()).sqrt()

    def present(self, positions: tuple[int, ...]) -> list[int]:
        """The layers the listed parameters belong to, in forward order."""
        return sorted({self.layer_of_param[p] for p in positions})

    def names_of(self, positions: Iterable[int]) -> list[str]:
        """Names of the layers owning the parameters at ``positions``, once each, in forward order."""
        return [self.names[layer] for layer in sorted({self.layer_of_param[p] for p in positions})]


class ForwardOrder:
    """The order in which a forward pass first calls each module (``name -> position``).

    Every module is watched, not only those owning parameters, so that a parameter owner its parent uses
    functionally can be placed after it. Hooks are attached by `watch` and removed by `stop`; one
    training pass is enough.
    """

    def __init__(self, order: Mapping[str, int] | None = None) -> None:
        self.order: dict[str, int] = dict(order or {})
        self._hooks: list[RemovableHandle] = []

    def watch(self, module: nn.Module) -> None:
        for name, child in module.named_modules():
            self._hooks.append(child.register_forward_pre_hook(self._hook(name)))

    def stop(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def record(module: nn.Module, args: Any) -> None:
            self.order.setdefault(name, len(self.order))

        return record
