"""LearningRateScale: multiply the optimizers' learning rates by a constant and an optional linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from stabilize.errors import ConfigurationError, check_integers


class LearningRateScale(Callback):
    """Scale the learning rate of the optimizers of any LightningModule, on top of its own schedule: the step ``s``
    (0-based, per optimizer) runs at ``factor * min(1, (s + 1) / warmup_steps)`` times the rate the module's
    optimizer and scheduler set.

    The factor is applied around each ``optimizer.step()`` (torch's step pre- and post-hooks) and taken off again
    right after, so schedulers that update the rate from its current value (``StepLR``, ``CosineAnnealingLR``'s
    recursive form, ``ReduceLROnPlateau``) keep seeing their own rates, and automatic and manual optimization,
    gradient accumulation and fp16's skipped steps (no ``step()``, no warm-up progress) all behave. This is how
    `stabilize.doctor.repair` tries "a lower learning rate" or "a warm-up" on a model it did not write.

    Args:
        factor: Constant multiplier of the learning rate (``0.1``: ten times lower).
        warmup_steps: Optimizer steps of a linear warm-up from ``factor / warmup_steps`` to ``factor``; 0: none.
        optimizers: Indices (in ``trainer.optimizers``' order) of the optimizers to scale; None: every one. A GAN's
            ``[0]`` speeds up its first network only (the generator, when it is configured first).

    Raises:
        ConfigurationError: If ``factor`` is not a positive finite number, ``warmup_steps`` is negative, or
            ``optimizers`` is empty or holds a negative index (or, at the start of fit, one the module does not have).

    Example:
        ```python
        trainer = Trainer(callbacks=[LearningRateScale(factor=0.1, warmup_steps=100)])
        ```

    Logs nothing: the rate an optimizer steps with is what ``LearningRateMonitor`` reads between steps, the
    module's own (the factor is applied only during the step).
    """

    def __init__(self, factor: float = 1.0, warmup_steps: int = 0, optimizers: Sequence[int] | None = None) -> None:
        super().__init__()
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ConfigurationError(f"factor must be a positive finite number, got {factor!r}.")
        check_integers(0, warmup_steps=warmup_steps)
        if optimizers is not None:
            if isinstance(optimizers, (str, bytes)) or not optimizers:
                raise ConfigurationError(f"optimizers must be a non-empty list of indices or None, got {optimizers!r}.")
            check_integers(0, **{f"optimizers[{i}]": index for i, index in enumerate(optimizers)})
        self.factor = float(factor)
        self.warmup_steps = warmup_steps
        self.optimizers = None if optimizers is None else sorted(set(optimizers))
        #: Steps taken so far by each optimizer (in the order of ``trainer.optimizers``), checkpointed.
        self.steps: list[int] = []
        self._handles: list[RemovableHandle] = []
        self._saved: dict[int, list[Any]] = {}

    def multiplier(self, step: int) -> float:
        """The factor the learning rate of an optimizer's ``step``-th step (0-based) is multiplied by."""
        if self.warmup_steps == 0:
            return self.factor
        return self.factor * min(1.0, (step + 1) / self.warmup_steps)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The optimizers exist from here on (the strategy set them up before this hook).
        self._remove_hooks()
        self.steps += [0] * (len(trainer.optimizers) - len(self.steps))
        missing = [i for i in self.optimizers or [] if i >= len(trainer.optimizers)]
        if missing:
            raise ConfigurationError(
                f"LearningRateScale(optimizers={self.optimizers}): the module has {len(trainer.optimizers)}"
                f" optimizer(s), no index {missing[0]}."
            )
        for index, optimizer in enumerate(trainer.optimizers):
            if self.optimizers is not None and index not in self.optimizers:
                continue
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook(index)))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook(index)))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))

    def _pre_hook(self, index: int) -> Any:
        def scale(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._saved[index] = [group["lr"] for group in optimizer.param_groups]
            multiplier = self.multiplier(self.steps[index])
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * multiplier

        return scale

    def _post_hook(self, index: int) -> Any:
        def restore(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group, lr in zip(optimizer.param_groups, self._saved.pop(index, [])):
                group["lr"] = lr
            self.steps[index] += 1

        return restore

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
