"""Where the host's time goes in one training step under Lightning: cProfile of FastCNN with tiny widths (so the
arithmetic is small) and GradientHealthCallback, reporting the cumulative time per step of the step's parts.

    python benchmarks/profile_host_step.py [--steps 200]

On a GPU the same Python runs on the host while kernels queue; when it takes longer than the kernels, the GPU waits
(see README "GPU figures": FastCNN's host time per epoch was 3x airbench's).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import FastCNN
from stabilize.testing import random_cifar10_folder

#: Parts of a step: (file name ending, function name), matched by name so that line numbers may move.
PARTS = {
    "LightningModule.log (all calls)": ("core/module.py", "log"),
    "GradientHealthCallback.on_before_optimizer_step": ("gradient_health.py", "on_before_optimizer_step"),
    "augmentation (on_after_batch_transfer)": ("cifar10.py", "on_after_batch_transfer"),
    "torchmetrics accuracy (forward)": ("torchmetrics/metric.py", "forward"),
    "FastCNN lookahead (on_train_batch_end)": ("fast.py", "on_train_batch_end"),
    "LR scheduler step": ("optim/lr_scheduler.py", "step"),
    "backward": ("torch/autograd/__init__.py", "backward"),
}


def fit(datamodule: CIFAR10DataModule, steps: int) -> None:
    seed_everything(0, verbose=False)
    model = FastCNN(widths=(4, 8, 8), lr=0.1, scheduler="triangular", warmup_fraction=0.2, label_smoothing=0.2)
    Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[GradientHealthCallback(verbose=False)],
    ).fit(model, datamodule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_cifar10_folder(Path(tmp), num_train=6400, num_test=64)
        datamodule = CIFAR10DataModule(
            str(folder), batch_size=32, val_size=0, scale=None, translate=2, alternate_flip=True, drop_last=True
        )
        fit(datamodule, 20)  # warm-up
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.runcall(fit, datamodule, args.steps)
        seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print(f"{args.steps} steps in {seconds:.2f} s ({1e3 * seconds / args.steps:.2f} ms per step, setup included)")
    for label, (filename, function) in PARTS.items():
        found = [value for key, value in stats.items() if key[0].endswith(filename) and key[2] == function]
        cumulative = max((value[3] for value in found), default=0.0)  # the outermost entry holds the rest
        print(f"  {label:<52} {1e3 * cumulative / args.steps:6.2f} ms per step")


if __name__ == "__main__":
    main()
