"""A callback that sends the process a signal at a chosen step: preemption on purpose."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAtStep(Callback):
    def __init__(self, step: int = 3, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
