"""Gradient clipping rules in plain torch, every decision on the device: fixed norm, AutoClip, ZClip and AGC."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from stabilize.health.norms import foreach_norms

ClipMethod = Literal["norm", "autoclip", "zclip", "agc"]


def total_norm(params: list[Tensor]) -> Tensor:
    """The L2 norm of all gradients of ``params``, as a device scalar (one fused kernel)."""
    return foreach_norms([p.grad for p in params if p.grad is not None]).square().sum().sqrt()


@dataclass
class ClipState:
    """What one optimizer's clipping remembers: recent total norms (a ring on the device), ZClip's moving mean and
    variance, and counts since the last read."""

    history: Tensor
    position: int = 0
    mean: Tensor = field(default_factory=lambda: torch.zeros(()))
    var: Tensor = field(default_factory=lambda: torch.zeros(()))
    seen: int = 0
    clipped: Tensor = field(default_factory=lambda: torch.zeros(()))
    skipped: int = 0
    threshold: Tensor = field(default_factory=lambda: torch.full((), math.inf))

    @classmethod
    def empty(cls, window: int, device: torch.device) -> ClipState:
        return cls(
            history=torch.full((window,), math.nan, device=device),
            mean=torch.zeros((), device=device),
            var=torch.zeros((), device=device),
            clipped=torch.zeros((), device=device),
            threshold=torch.full((), math.inf, device=device),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.tolist(),
            "position": self.position,
            "mean": float(self.mean),
            "var": float(self.var),
            "seen": self.seen,
            "skipped": self.skipped,
        }

    def load(self, state: dict[str, Any]) -> None:
        device = self.history.device
        history = torch.tensor(state["history"], device=device)
        if history.shape == self.history.shape:
            self.history.copy_(history)
        self.position, self.seen, self.skipped = state["position"], state["seen"], state["skipped"]
        self.mean.fill_(state["mean"])
        self.var.fill_(state["var"])


@dataclass(frozen=True)
class ClipRule:
    """How to clip.

    Args:
        method: ``"norm"``: scale all gradients so that their total norm is at most ``max_norm``. ``"autoclip"``
            (Seetharaman et al. 2020): the same with the ``percentile``-th percentile of the recent total norms as the
            limit. ``"zclip"`` (Kumar et al. 2025): the limit is the moving mean plus ``z`` moving standard
            deviations of the total norm (after ``warmup_steps``). ``"agc"`` (Brock et al. 2021): unit-wise, each
            output unit's gradient is at most ``agc_clip`` times its weight norm.
        max_norm: Limit of ``"norm"``.
        percentile: Percentile of ``"autoclip"``.
        window: Recent steps remembered (AutoClip's history, the median of ``skip_spikes``).
        z: Standard deviations of ``"zclip"``.
        ema_decay: Decay of ZClip's moving mean and variance.
        warmup_steps: Steps ZClip only measures.
        agc_clip: Ratio of ``"agc"``.
    """

    method: ClipMethod = "norm"
    max_norm: float = 1.0
    percentile: float = 10.0
    window: int = 1000
    z: float = 2.5
    ema_decay: float = 0.97
    warmup_steps: int = 25
    agc_clip: float = 0.01

    def clip(self, params: list[Tensor], state: ClipState, total: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Clip the gradients of ``params`` in place; returns the total norm before and after (device scalars).
        ``total`` is the total norm when the caller has it already. A non-finite total (an fp16 overflow the
        GradScaler will skip) is left alone and not remembered."""
        grads = [p.grad for p in params if p.grad is not None]
        total = total_norm(params) if total is None else total
        finite = torch.isfinite(total)
        if self.method == "agc":
            self._agc(params)
            post = total_norm(params)
            state.threshold = torch.full((), self.agc_clip, device=total.device)
        else:
            state.threshold = self._threshold(state, total.device)
            coefficient = torch.where(finite, (state.threshold / (total + 1e-6)).clamp(max=1.0), 1.0)
            torch._foreach_mul_(grads, coefficient)
            post = total * coefficient
            state.clipped += finite & (coefficient < 1.0)
        remembered = torch.where(finite, total, torch.nan)
        state.history[state.position % len(state.history)] = remembered
        state.position += 1
        if self.method == "zclip":
            decay = self.ema_decay
            value = torch.where(finite, post, state.mean)
            first = state.seen == 0
            state.mean = value if first else decay * state.mean + (1 - decay) * value
            state.var = state.var if first else decay * state.var + (1 - decay) * (value - state.mean).square()
            state.seen += 1
        return total, post

    def _threshold(self, state: ClipState, device: torch.device) -> Tensor:
        if self.method == "norm":
            return torch.full((), self.max_norm, device=device)
        if self.method == "autoclip":
            if not state.position:
                return torch.full((), math.inf, device=device)
            quantile = torch.nanquantile(state.history, self.percentile / 100)  # NaN while nothing is remembered
            return torch.where(torch.isnan(quantile), math.inf, quantile)
        if state.seen < self.warmup_steps:
            return torch.full((), math.inf, device=device)
        return state.mean + self.z * state.var.sqrt()

    def _agc(self, params: list[Tensor]) -> None:
        with torch.no_grad():
            for param in params:
                if param.grad is None:
                    continue
                dims = tuple(range(1, param.ndim)) if param.ndim > 1 else (0,)
                weight = param.detach().norm(dim=dims, keepdim=True).clamp(min=1e-3)
                grad = param.grad.norm(dim=dims, keepdim=True)
                limit = self.agc_clip * weight
                param.grad.mul_(torch.where(grad > limit, limit / grad.clamp(min=1e-12), 1.0))
