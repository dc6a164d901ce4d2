"""GradientClipping: fixed, adaptive (AutoClip, ZClip) and unit-wise (AGC) clipping, and skipping of spikes."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from stabilize.callbacks.optimizers import optimizer_index, pending_grad_scaler
from stabilize.errors import ConfigurationError, check_integers
from stabilize.health.clipping import ClipMethod, ClipRule, ClipState, total_norm


class GradientClipping(Callback):
    """Clip gradients in ``on_before_optimizer_step``, for automatic and manual optimization and any number of
    optimizers, with every decision on the device (no host sync per step, except to drop a step under
    ``skip_spikes``). Under fp16 AMP the gradients are already unscaled there and a step the GradScaler will skip
    (non-finite norm) is neither clipped nor remembered; under DDP they are already all-reduced, so every rank takes
    the same decision without a collective.

    Put it after `GradientHealthCallback` in ``callbacks``: Lightning calls them in order,
    so the health callback reports the norm before clipping, and this one logs the norm after.

    Args:
        method: ``"norm"``, ``"autoclip"``, ``"zclip"`` or ``"agc"`` (see `stabilize.health.clipping.ClipRule`).
        max_norm: Limit of ``"norm"``.
        percentile: AutoClip's percentile of recent total norms.
        window: Recent steps remembered.
        z: ZClip's standard deviations above the moving mean.
        ema_decay: ZClip's moving-average decay.
        warmup_steps: Steps ZClip only measures.
        agc_clip: AGC's largest gradient-to-weight norm ratio per unit.
        skip_spikes: Drop the whole step (no weight or optimizer-state change) when the total norm exceeds this many
            times the median of the remembered norms; ``None`` never drops. Costs one host sync per step.
        log_every_n_steps: Steps between logged values; defaults to the Trainer's.

    Raises:
        ConfigurationError: For an unknown method or an out-of-range value.

    Example:
        ```python
        trainer = Trainer(callbacks=[GradientHealthCallback(), GradientClipping(method="autoclip")])
        ```

    Logged metrics (``grad_clip/optimizer_<i>/...`` with several optimizers):

    | key | value |
    |---|---|
    | ``grad_clip/threshold`` | the limit at the logging step (AGC: the ratio) |
    | ``grad_clip/clipped_fraction`` | fraction of the steps since the last log that were clipped |
    | ``grad_clip/skipped`` | steps dropped by ``skip_spikes`` so far |
    | ``grad_clip/pre_norm`` | total gradient norm before clipping |
    | ``grad_clip/post_norm`` | total gradient norm after clipping |
    """

    def __init__(
        self,
        method: ClipMethod = "norm",
        max_norm: float = 1.0,
        percentile: float = 10.0,
        window: int = 1000,
        z: float = 2.5,
        ema_decay: float = 0.97,
        warmup_steps: int = 25,
        agc_clip: float = 0.01,
        skip_spikes: float | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if method not in ("norm", "autoclip", "zclip", "agc"):
            raise ConfigurationError(f"method must be 'norm', 'autoclip', 'zclip' or 'agc', got {method!r}.")
        checks = [
            (max_norm > 0 and math.isfinite(max_norm), f"max_norm must be positive, got {max_norm}."),
            (0 < percentile <= 100, f"percentile must be in (0, 100], got {percentile}."),
            (isinstance(window, int) and window >= 3, f"window must be an integer of at least 3, got {window!r}."),
            (z > 0, f"z must be positive, got {z}."),
            (0 < ema_decay < 1, f"ema_decay must be in (0, 1), got {ema_decay}."),
            (agc_clip > 0, f"agc_clip must be positive, got {agc_clip}."),
            (skip_spikes is None or skip_spikes > 1, f"skip_spikes must be above 1 or None, got {skip_spikes}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(message)
        check_integers(0, warmup_steps=warmup_steps)
        check_integers(1, log_every_n_steps=log_every_n_steps)
        self.rule = ClipRule(method, max_norm, percentile, window, z, ema_decay, warmup_steps, agc_clip)
        self.skip_spikes = skip_spikes
        self.log_every_n_steps = log_every_n_steps
        self._states: dict[int, ClipState] = {}
        self._saved: dict[int, dict[str, Any]] = {}
        self._since_log: dict[int, int] = {}
        self._warned_fused = False

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = optimizer_index(trainer, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        if pending_grad_scaler(trainer, optimizer) is not None:
            if not self._warned_fused:
                rank_zero_warn("GradientClipping does not clip fused optimizers under fp16 AMP; use fused=False.")
                self._warned_fused = True
            return
        state = self._state(index, params[0].device)
        total = total_norm(params)
        if self.skip_spikes is not None and state.position >= 3:
            median = torch.nanmedian(state.history)
            if bool(total > self.skip_spikes * median):  # the one host sync of skip_spikes
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None
                state.skipped += 1
                rank_zero_warn(
                    f"GradientClipping dropped step {trainer.global_step}: norm above {self.skip_spikes}x median."
                )
                return
        pre, post = self.rule.clip(params, state, total)
        self._since_log[index] = self._since_log.get(index, 0) + 1
        every = self.log_every_n_steps or max(getattr(trainer, "log_every_n_steps", 1), 1)
        if trainer.global_step % every == 0 and trainer.is_global_zero:
            prefix = f"optimizer_{index}/" if len(trainer.optimizers) > 1 else ""
            values = torch.stack([state.threshold.float(), state.clipped.float(), pre.float(), post.float()]).tolist()
            steps = self._since_log[index]
            metrics = {
                f"grad_clip/{prefix}threshold": values[0],
                f"grad_clip/{prefix}clipped_fraction": values[1] / steps,
                f"grad_clip/{prefix}skipped": float(state.skipped),
                f"grad_clip/{prefix}pre_norm": values[2],
                f"grad_clip/{prefix}post_norm": values[3],
            }
            for logger in trainer.loggers:
                logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=trainer.global_step)
            state.clipped.zero_()
            self._since_log[index] = 0

    def _state(self, index: int, device: torch.device) -> ClipState:
        if index not in self._states or self._states[index].history.device != device:
            self._states[index] = ClipState.empty(self.rule.window, device)
            if index in self._saved:
                self._states[index].load(self._saved.pop(index))
        return self._states[index]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"states": {i: s.state_dict() for i, s in self._states.items()} | self._saved}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states = {}
        self._saved = {int(i): s for i, s in state_dict.get("states", {}).items()}
