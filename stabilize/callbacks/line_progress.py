"""LineProgress: one plain line per N training steps and per epoch, for logs that are files, not terminals."""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override

from stabilize.errors import check_integers


class LineProgress(ProgressBar):
    """A progress report for output that is not a terminal (a job's log file, CI, ``| tee``): one line every
    ``every_n_steps`` optimizer steps and one per finished epoch and validation, instead of the thousands of
    carriage-return redraws a bar writes into a file.

    The ``stabilize`` command and ``stabilize study`` use it in place of Lightning's bar whenever stderr is not a
    terminal.

    Args:
        every_n_steps: Optimizer steps between two lines during an epoch.
        prefix: Put in front of every line (a study's run name).

    Raises:
        ConfigurationError: If ``every_n_steps`` is not a positive integer.

    Example:
        ```python
        trainer = Trainer(callbacks=[LineProgress(every_n_steps=100)])
        # epoch 0  batch 100/390  step 100  1.71 s/10 steps  train/loss_step=2.01
        ```

    """

    def __init__(self, every_n_steps: int = 50, prefix: str = "") -> None:
        super().__init__()
        check_integers(1, every_n_steps=every_n_steps)
        self.every_n_steps = every_n_steps
        self.prefix = f"{prefix}: " if prefix else ""
        self._enabled = True
        self._last: tuple[int, float] | None = None

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._enabled or step == 0 or step % self.every_n_steps or (self._last and self._last[0] == step):
            return
        now = time.perf_counter()
        pace = ""
        if self._last is not None:
            pace = f"  {(now - self._last[1]) / (step - self._last[0]) * 10:.2f} s/10 steps"
        self._last = (step, now)
        total = trainer.num_training_batches
        where = f"{batch_idx + 1}/{total}" if isinstance(total, int) else str(batch_idx + 1)
        self._line(
            f"epoch {trainer.current_epoch}  batch {where}  step {step}{pace}  {self._metrics(trainer, pl_module)}"
        )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled:
            self._line(
                f"epoch {trainer.current_epoch} done  step {trainer.global_step}  {self._metrics(trainer, pl_module)}"
            )

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking and trainer.state.fn == "fit":
            values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            shown = "  ".join(f"{k}={float(v):.4g}" for k, v in values.items())
            self._line(f"validation after epoch {trainer.current_epoch}  {shown}")

    def _metrics(self, trainer: Trainer, pl_module: LightningModule) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())

    def _line(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=sys.stderr, flush=True)
