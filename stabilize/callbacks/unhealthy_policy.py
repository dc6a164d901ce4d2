"""What GradientHealthCallback does when a finding is confirmed during training: say so, or also stop the run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

from stabilize.callbacks.gradient_health_output import HealthOutput
from stabilize.errors import ConfigurationError
from stabilize.health.records import Alert

UnhealthyPolicy = Literal["warn", "stop", "ignore"]
#: Advice printed with an alert of each kind (the diagnosis at the end of ``fit`` has the full remedies).
ALERT_ADVICE = {
    "unstable": "lower the learning rate or add a warm-up",
    "exploding": "clip gradients, lower the learning rate or add a warm-up",
}


class UnhealthyAlarm:
    """Carries out ``on_unhealthy`` for the alerts of `GradientMonitor.new_alerts`: ``"warn"`` writes one log line
    per alert (rank zero) and, with a TensorBoardLogger, a text ``grad_health/alerts`` and a scalar
    ``grad_health/alert_<kind>`` at its step;
    ``"stop"`` also saves a checkpoint (``unhealthy-step=<step>.ckpt`` in the ModelCheckpoint's folder, else the
    Trainer's ``default_root_dir``) and stops the run after the batch; ``"ignore"`` keeps the alerts in the summary
    only. Under DDP every process computes its own alerts from its own loss; whether to stop is rank zero's,
    broadcast at the logging step that may change it, so that every process saves and stops together.

    Raises:
        ConfigurationError: For an unknown policy.
    """

    def __init__(self, policy: str) -> None:
        if policy not in ("warn", "stop", "ignore"):
            raise ConfigurationError(f"on_unhealthy must be 'warn', 'stop' or 'ignore', got {policy!r}.")
        self.policy = policy
        self._stop_due = False
        self._decide_due = False
        #: The checkpoint saved before stopping, if any.
        self.checkpoint: Path | None = None

    def raise_alerts(self, trainer: Trainer, alerts: list[Alert], prefix: str = "", stop: bool = True) -> None:
        """Say what the new ``alerts`` found (called at logging steps, on every process; at the end of training with
        ``stop=False``: there is nothing left to stop)."""
        self._decide_due = self.policy == "stop" and stop
        if not alerts or self.policy == "ignore":
            return
        self._stop_due = self.policy == "stop" and stop
        if not trainer.is_global_zero:
            return
        for alert in alerts:
            where = f" ({prefix.rstrip('/')})" if prefix else ""
            action = " Saving a checkpoint and stopping (on_unhealthy='stop')." if self._stop_due else ""
            line = (
                f"GradientHealthCallback{where}: {alert['kind'].upper()} at step {alert['step']}: {alert['evidence']}."
                f" {ALERT_ADVICE[alert['kind']].capitalize()}.{action}"
            )
            rank_zero_warn(line)
            HealthOutput.scalars(trainer.loggers, {f"grad_health/{prefix}alert_{alert['kind']}": 1.0}, alert["step"])
            for writer in HealthOutput.tensorboard_writers(trainer.loggers):
                writer.add_text(f"grad_health/{prefix}alerts", line, global_step=alert["step"])

    def after_batch(self, trainer: Trainer) -> None:
        """With ``"stop"``: after a logging step, agree with rank zero whether to stop; if so, save and stop."""
        if not self._decide_due:
            return
        self._decide_due = False
        stop = bool(trainer.strategy.broadcast(self._stop_due, src=0))
        if not stop:
            return
        self._stop_due = False
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        self.checkpoint = Path(folder) / f"unhealthy-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(self.checkpoint)
        trainer.should_stop = True
