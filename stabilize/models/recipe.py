"""TrainingRecipe: what every model of the collection shares, whatever its data: optimizers, learning-rate
schedules, weight-decay groups, a fit that diverged raising, and advice for GradientHealthCallback."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR
from torch.utils import _foreach_utils
from typing_extensions import override

from stabilize.errors import ConfigurationError, TrainingDivergedError
from stabilize.models.epoch_means import DeviceLoggedModule
from stabilize.models.variants import Variant

OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
SchedulerName = Literal["cosine", "onecycle", "triangular", "constant"]

# One-cycle needs a warm-up phase; this is PyTorch's own default when none is given.
ONECYCLE_DEFAULT_WARMUP = 0.3


class TrainingRecipe(DeviceLoggedModule):
    """The optimizer and schedule half of every model here; subclasses add the network, the loss and the metrics.

    `save_hyperparameters` is called here and records the arguments of the whole ``__init__`` chain, so a
    subclass reads its own arguments from ``self.hparams`` (once ``super().__init__`` has run) and every checkpoint
    reloads with ``load_from_checkpoint``.

    Args:
        optimizer: ``"sgd"`` (with ``momentum`` and ``nesterov``), ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
        lr: Peak learning rate (reached after the warm-up).
        momentum: Momentum of SGD and RMSprop.
        nesterov: Nesterov momentum for SGD.
        betas: Adam/AdamW coefficients.
        weight_decay: L2 penalty (decoupled for AdamW). Never applied to normalization weights or biases, i.e. to
            any parameter with fewer than two dimensions.
        scheduler: ``"cosine"`` (linear warm-up, then cosine decay to zero), ``"onecycle"``
            (`OneCycleLR`), ``"triangular"`` (linear from 0.2x up to the peak at
            the end of the warm-up, then linearly down to 0.07x, as in the CIFAR-10 speed runs) or ``"constant"``.
            All step once per optimizer step.
        warmup_fraction: Fraction of the total optimizer steps spent warming up (cosine, one-cycle and
            triangular, whose peak it places; one-cycle uses 0.3 when this is 0).

    Raises:
        ConfigurationError: If an argument is out of range or names an unknown optimizer or schedule.
    """

    #: A base to build on, not one to train: ``stabilize --help`` leaves it out of its list of classes.
    abstract_base = True

    def __init__(
        self,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 5e-4,
        scheduler: SchedulerName = "cosine",
        warmup_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        check_recipe(optimizer, lr, momentum, betas, weight_decay, scheduler, warmup_fraction)
        self.save_hyperparameters()

    def stabilize_variants(self) -> dict[str, Variant]:
        """The structural changes ``stabilize doctor`` may try on this model (kinds of
        `stabilize.doctor.VARIANT_KINDS`): here AdamW at its usual LR for a run under SGD or RMSprop;
        subclasses add their architecture's stabilized twins."""
        if self.hparams["optimizer"] in ("adam", "adamw"):
            return {}
        words = f"AdamW at LR 1e-3 instead of {self.hparams['optimizer']}"
        return {"adamw": Variant(words, {"optimizer": "adamw", "lr": 1e-3})}

    def gradient_health_hints(self) -> dict[str, str]:
        """Advice specific to this collection that `GradientHealthCallback` adds to its
        generic remedies (keys ``"vanishing"``, ``"exploding"``, ``"nonfinite"``)."""
        warmup = "with the stabilize command, --model.warmup_fraction 0.05 adds a warm-up"
        return {"exploding": warmup, "nonfinite": warmup}

    @override
    def on_train_end(self) -> None:
        # One host read per fit: a run that diverged must not end as if it had trained.
        finite = torch.stack([p.detach().isfinite().all() for p in self.parameters()]).all()
        if not bool(finite):
            step = self.trainer.global_step if self._trainer is not None else "?"
            raise TrainingDivergedError(
                f"{type(self).__name__}'s weights are NaN/Inf after {step} optimizer steps: training diverged."
                " Lower the learning rate or add a warm-up (--model.lr, --model.warmup_fraction), clip gradients"
                " (--trainer.gradient_clip_val 1.0), or drop such steps with"
                " GradientHealthCallback(on_nonfinite='skip')."
            )

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Split the trainable parameters into weight-decayed weights and non-decayed norm weights and biases.

        Parameters with fewer than two dimensions (norm scales and shifts, biases, scalar gains) get no weight
        decay: decaying them only fights the normalization. Override to add groups with their own learning rate.
        """
        decay: list[Tensor] = []
        no_decay: list[Tensor] = []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self._build_optimizer(self.parameter_groups())
        scheduler = self._build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        hp = self.hparams
        # foreach: one kernel launch per group and operation instead of one per parameter. PyTorch picks it by
        # default on CUDA only; on the CPU it gives bitwise the same steps (SGD, Adam, AdamW, RMSprop) and saves a
        # small net's per-parameter Python (80 us a step for FastCNN's three groups here).
        if hp["optimizer"] == "sgd":
            nesterov = hp["nesterov"] and hp["momentum"] > 0
            speed = {"fused": True} if self._fused_sgd_allowed(groups) else {"foreach": True}
            return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], nesterov=nesterov, **speed)
        if hp["optimizer"] == "adam":
            return torch.optim.Adam(groups, lr=hp["lr"], betas=tuple(hp["betas"]), foreach=True)
        if hp["optimizer"] == "adamw":
            return torch.optim.AdamW(groups, lr=hp["lr"], betas=tuple(hp["betas"]), foreach=True)
        return torch.optim.RMSprop(groups, lr=hp["lr"], momentum=hp["momentum"], foreach=True)

    def _fused_sgd_allowed(self, groups: list[dict[str, Any]]) -> bool:
        """Whether SGD runs fused: one kernel per group for the whole update, 60 us a step less for FastCNN's three
        groups on the CPU (issue 22). The same arithmetic as ``foreach`` but not always the same rounding: bitwise at
        a constant learning rate with weight decay, a few float32 ulps apart under a schedule or without weight
        decay (3e-9 relative in the weights after 40 steps of the quickstart's BatchNormCNN; after its 300 steps the
        third decimal of the loss moves), so a run since 2026-12-03 repeats one from before only to rounding.

        Not under fp16 AMP: a fused step unscales the gradients itself, after ``on_before_optimizer_step``, and
        Lightning refuses to clip them; not on a device without fused kernels. (Adam and AdamW stay ``foreach``:
        their fused steps round differently.)"""
        plugin = self._trainer.precision_plugin if self._trainer is not None else None
        if getattr(plugin, "scaler", None) is not None:
            return False
        # A private helper of PyTorch's (torch >= 2.0); without it, CUDA only, where fused kernels have always been.
        supported = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
        return all(p.device.type in supported and p.is_floating_point() for g in groups for p in g["params"])

    def total_steps(self) -> int:
        """Optimizer steps of the whole fit, as the Trainer estimates them (needed by the decaying schedules)."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigurationError(
                f"scheduler={self.hparams['scheduler']!r} needs a finite training length: set the Trainer's max_epochs"
                " or max_steps, or use scheduler='constant'."
            )
        return int(total)

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
        hp = self.hparams
        if hp["scheduler"] == "constant":
            return None
        total = self.total_steps()
        if hp["scheduler"] == "onecycle":
            return OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=total,
                pct_start=hp["warmup_fraction"] or ONECYCLE_DEFAULT_WARMUP,
                # Cycling momentum needs a momentum to cycle; RMSprop without one must stay without one.
                cycle_momentum=hp["optimizer"] != "rmsprop" or hp["momentum"] > 0,
            )
        warmup = round(hp["warmup_fraction"] * total)
        if hp["scheduler"] == "triangular":
            return LambdaLR(optimizer, triangular(total, warmup))
        # A subclass may end the cosine above zero (TransformerLM's final_lr_fraction; its own argument, so that the
        # checkpoints of the other models keep reloading with their own signatures).
        return LambdaLR(optimizer, cosine_with_warmup(total, warmup, hp.get("final_lr_fraction", 0.0)))


def cosine_with_warmup(total_steps: int, warmup_steps: int, final: float = 0.0) -> Any:
    """LR multiplier: linear warm-up over ``warmup_steps``, then a cosine from 1 to ``final`` at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def triangular(total_steps: int, peak_step: int, start: float = 0.2, end: float = 0.07) -> Any:
    """LR multiplier: linear from ``start`` to 1 at ``peak_step``, then linear to ``end`` at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < peak_step:
            return start + (1.0 - start) * step / peak_step
        progress = min((step - peak_step) / max(total_steps - peak_step, 1), 1.0)
        return 1.0 + (end - 1.0) * progress

    return multiplier


def check_recipe(
    optimizer: str,
    lr: float,
    momentum: float,
    betas: tuple[float, float],
    weight_decay: float,
    scheduler: str,
    warmup_fraction: float,
) -> None:
    checks = [
        (
            optimizer in get_args(OptimizerName),
            f"optimizer must be one of {', '.join(get_args(OptimizerName))}; got {optimizer!r}.",
        ),
        (math.isfinite(lr) and lr > 0, f"lr must be a positive finite number, got {lr}."),
        (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}."),
        (len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two numbers in [0, 1), got {betas}."),
        (weight_decay >= 0, f"weight_decay must be non-negative, got {weight_decay}."),
        (
            scheduler in get_args(SchedulerName),
            f"scheduler must be one of {', '.join(get_args(SchedulerName))}; got {scheduler!r}.",
        ),
        (0 <= warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {warmup_fraction}."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigurationError(message)
