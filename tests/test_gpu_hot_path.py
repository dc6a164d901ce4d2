"""GPU-only: no host synchronisation in the training hot path (skipped where there is no CUDA device).

Between the end of one non-logging step and the end of the next, everything the fast path does (batch from
GPU-resident data, per-image augmentation, forward, backward, optimizer, GradientHealthCallback's cheap check) runs
under ``torch.cuda.set_sync_debug_mode("warn")``; the test records the Python stack of every synchronising call
and fails listing each distinct one (so one GPU run names all offenders, not only the first).
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import FastCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOG_EVERY = 10


class RecordSyncsBetweenLoggingSteps(Callback):
    def __init__(self) -> None:
        self.checked_steps = 0
        self.stacks: dict[str, int] = {}

    def _record(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if "called a synchronizing CUDA operation" in str(message):  # not the prototype-feature notice
            stack = "".join(traceback.format_stack(limit=14)[:-1])
            self.stacks[stack] = self.stacks.get(stack, 0) + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")
        next_step = trainer.global_step
        if next_step % LOG_EVERY and (batch_idx + 2) < trainer.num_training_batches:
            torch.cuda.set_sync_debug_mode("warn")
            self.checked_steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("scale", [None, (0.9, 1.1)], ids=["shift-flip", "scale-shift-flip"])
def test_fast_path_has_no_host_sync_per_step(tiny_cifar: Path, tmp_path: Path, scale: Any) -> None:
    datamodule = CIFAR10DataModule(
        str(tiny_cifar), val_size=0, batch_size=16, device="cuda", scale=scale, translate=2, alternate_flip=True
    )
    guard = RecordSyncsBetweenLoggingSteps()
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
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = guard._record
        trainer.fit(model, datamodule)
    assert guard.checked_steps >= 5
    report = "\n\n".join(f"{count} x at:\n{stack}" for stack, count in guard.stacks.items())
    assert not guard.stacks, f"host syncs in the hot path:\n{report}"
