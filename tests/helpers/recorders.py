"""Callbacks that write what a (multi-process) run saw, for tests that run the CLI in subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from stabilize.callbacks import GradientHealthCallback


class SeenSamples(Callback):
    """Writes ``<out_dir>/rank<r>.json``: a checksum of every training image each rank saw in epoch 0, and on rank
    zero the global gradient norms GradientHealthCallback recorded."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.checksums: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.current_epoch == 0:
            images = batch[0]
            self.checksums += images.flatten(1).double().sum(1).tolist()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        health = next((c for c in trainer.callbacks if isinstance(c, GradientHealthCallback)), None)
        norms = [r["global_norm"] for r in health.history] if health is not None else []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"checksums": self.checksums, "global_norms": norms, "world_size": trainer.world_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
