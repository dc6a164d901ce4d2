"""What GradientHealthCallback does with a step whose gradients are NaN/Inf: warn later, skip it, or stop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from stabilize.errors import ConfigurationError
from stabilize.health.monitor import GradientMonitor
from stabilize.health.pending import Observation
from stabilize.health.snapshot import BufferSnapshot

NonFinitePolicy = Literal["warn", "skip", "raise"]


class NonFiniteGuard:
    """Carries out ``on_nonfinite``: ``"warn"`` leaves everything to the counters; ``"skip"`` drops the step's
    gradients and restores the buffers its forward passes wrote (a snapshot taken at the first micro-batch after each
    step); ``"raise"`` prints the diagnosis so far and stops. ``skip`` and ``raise`` read one flag per step.

    Raises:
        ConfigurationError: For an unknown policy.
    """

    def __init__(self, policy: str) -> None:
        if policy not in ("warn", "skip", "raise"):
            raise ConfigurationError(f"on_nonfinite must be 'warn', 'skip' or 'raise', got {policy!r}.")
        self.policy = policy
        self._buffers = BufferSnapshot()
        self._snapshot_due = True

    def before_batch(self, module: LightningModule) -> None:
        if self.policy == "skip" and self._snapshot_due:
            self._buffers.take(module)
            self._snapshot_due = False

    def before_step(self) -> None:
        self._snapshot_due = True

    def must_act(self, observation: Observation, amp: bool) -> bool:
        """Whether this step is non-finite and the policy decides now (the one host sync of skip/raise)."""
        return self.policy != "warn" and not amp and bool(observation.tensor_nonfinite.any())

    def act(
        self,
        trainer: Trainer,
        module: LightningModule,
        monitor: GradientMonitor,
        observation: Observation,
        step: int,
        diagnosis: Callable[[], str],
    ) -> None:
        bad = monitor.nonfinite_layers(observation)
        listed = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        if self.policy == "raise":
            monitor.flush()
            if trainer.is_global_zero:  # the spikes before the NaN are the most useful part
                rank_zero_info(diagnosis())
            raise FloatingPointError(
                f"Non-finite (NaN/Inf) gradients at optimizer step {step} in {len(bad)} layer(s): {listed}."
                " Lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)) or check the loss for"
                " log(0) / division by zero."
            )
        monitor.skip(step)
        self._buffers.restore()
        if trainer.is_global_zero:
            rank_zero_warn(f"GradientHealthCallback skipped optimizer step {step}: non-finite gradients in {listed}.")
        state = [*module.parameters(), *module.buffers()]
        finite = torch.stack([t.detach().isfinite().all() for t in state if t.is_floating_point()]).all()
        if not bool(finite):
            raise FloatingPointError(
                f"Optimizer step {step} was skipped, but the model already holds NaN/Inf weights or buffers that a"
                " skip cannot repair (they were non-finite before this step). Restart from an earlier checkpoint."
            )
