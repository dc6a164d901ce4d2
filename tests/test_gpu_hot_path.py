"""GPU-only: no host synchronisation in the training hot path (skipped where there is no CUDA device).

Between the end of one non-logging step and the end of the next, everything the fast path does (batch from
GPU-resident data, per-image augmentation, forward, backward, optimizer, GradientHealthCallback's cheap check) runs
under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import FastCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOG_EVERY = 10


class ForbidSyncBetweenLoggingSteps(Callback):
    def __init__(self) -> None:
        self.checked_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")
        next_step = trainer.global_step
        if next_step % LOG_EVERY and (batch_idx + 2) < trainer.num_training_batches:
            torch.cuda.set_sync_debug_mode("error")
            self.checked_steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode("default")


def test_fast_path_has_no_host_sync_per_step(tiny_cifar: Path, tmp_path: Path) -> None:
    datamodule = CIFAR10DataModule(
        str(tiny_cifar), val_size=0, batch_size=16, device="cuda", scale=None, translate=2, alternate_flip=True
    )
    guard = ForbidSyncBetweenLoggingSteps()
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=LOG_EVERY,
        callbacks=[GradientHealthCallback(verbose=False, log_every_n_steps=LOG_EVERY), guard],
    )
    model = FastCNN(widths=(16, 32, 32), lookahead_every=5, channels_last=True, scheduler="constant")
    trainer.fit(model, datamodule)
    assert guard.checked_steps >= 5
