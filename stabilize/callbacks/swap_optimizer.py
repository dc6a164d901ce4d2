"""SwapOptimizer: train any LightningModule with AdamW (or SGD) instead of the optimizer it configures."""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from stabilize.errors import ConfigurationError

#: The optimizers each target counts as already in place (Adam and AdamW differ only in their weight decay).
_FAMILIES: dict[str, tuple[type[torch.optim.Optimizer], ...]] = {
    "adamw": (torch.optim.Adam, torch.optim.AdamW),
    "sgd": (torch.optim.SGD,),
}


class SwapOptimizer(Callback):
    """Replace each optimizer the module configures by AdamW (``to="adamw"``) or SGD with momentum 0.9
    (``to="sgd"``) over the same parameter groups, before the first step.

    Group ``i`` of the new optimizer trains the same parameters at ``lr * lr_i / lr_0`` (the module's ratios between
    its groups kept, ``lr_0`` its first group's rate) with the group's own weight decay; the other hyperparameters
    are the new optimizer's defaults (they do not translate: SGD's momentum means nothing to AdamW). Schedulers
    that drive the old optimizer drive the new one, from base rates scaled the same way. Optimizers already of the
    target's family (Adam or AdamW for ``"adamw"``) are left alone. This is how `stabilize.doctor.doctor`
    tries "AdamW instead of SGD" on a model it did not write.

    The swap happens in ``on_fit_start``, before Lightning restores a checkpoint's optimizer state, so a resumed run
    gets back the state of the optimizer it saved (the new one).

    Args:
        to: ``"adamw"`` or ``"sgd"``.
        lr: The new optimizer's learning rate for the first parameter group (default: 1e-3 for AdamW, the rate
            most Adam recipes start from; 0.1 for SGD).

    Raises:
        ConfigurationError: If ``to`` is not one of the two, or ``lr`` is not a positive finite number.

    Example:
        ```python
        trainer = Trainer(callbacks=[SwapOptimizer("adamw", lr=3e-4)])
        ```

    Logs nothing; says once which optimizers it replaced.
    """

    def __init__(self, to: str = "adamw", lr: float | None = None) -> None:
        super().__init__()
        if to not in _FAMILIES:
            raise ConfigurationError(f"to must be one of {sorted(_FAMILIES)}, got {to!r}.")
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigurationError(f"lr must be a positive finite number, got {lr!r}.")
        self.to = to
        self.lr = float(lr) if lr is not None else (1e-3 if to == "adamw" else 0.1)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The strategy built the optimizers before this hook; a checkpoint's state is loaded after it.
        optimizers = list(trainer.optimizers)
        swapped = []
        for index, old in enumerate(optimizers):
            if isinstance(old, _FAMILIES[self.to]):
                continue
            new = self.replacement(old)
            optimizers[index] = new
            for config in trainer.lr_scheduler_configs:
                scheduler: Any = config.scheduler
                if getattr(scheduler, "optimizer", None) is old:
                    scheduler.optimizer = new
                    _track_steps(new)
                    if hasattr(scheduler, "base_lrs"):
                        scheduler.base_lrs = [group.get("initial_lr", group["lr"]) for group in new.param_groups]
            swapped.append(type(old).__name__)
        if swapped:
            trainer.strategy.optimizers = optimizers
            rank_zero_info(f"SwapOptimizer: {', '.join(swapped)} -> {type(optimizers[0]).__name__} (lr {self.lr:g}).")

    def replacement(self, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The new optimizer over ``old``'s parameter groups (see the class docstring)."""
        first = old.param_groups[0]["lr"]
        scale = self.lr / first if first > 0 else 1.0
        groups = []
        for group in old.param_groups:
            # Keys of the old optimizer's own hyperparameters go (momentum, betas, ...); the user's keys stay.
            kept = {k: v for k, v in group.items() if k not in old.defaults or k in ("params", "weight_decay")}
            kept["lr"] = self.lr if first <= 0 else group["lr"] * scale
            if "initial_lr" in group:
                kept["initial_lr"] = group["initial_lr"] * scale
            groups.append(kept)
        if self.to == "adamw":
            return torch.optim.AdamW(groups, lr=self.lr)
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9)


def _track_steps(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` as torch's LR schedulers do at their construction (they check, at their own step,
    that the optimizer stepped first, and warn when its ``step`` lacks their wrapper)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step, owner = optimizer.step.__func__, weakref.ref(optimizer)  # type: ignore[attr-defined]

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        instance = owner()
        instance._opt_called = True  # type: ignore[union-attr]
        return step(instance, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
