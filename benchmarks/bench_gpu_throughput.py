"""Training throughput under Lightning versus a raw PyTorch loop, and what the augmentation costs of a step.

``--part throughput``: ResNet-20 and ResNet-56 training images/s (bf16-mixed, channels_last, batch 512, uint8
data resident on the GPU, scale + translation + flip per image) three ways, interleaved over ``--rounds`` rounds
(median reported): Lightning without a callback, Lightning with ``GradientHealthCallback()`` at its defaults (both
with a TensorBoard logger, as a user runs it), and a raw loop with the same network, optimizer, batches and
augmentation. Ratios: Lightning/raw and callback/no callback.

``--part augment``: images/s of the datamodule's augmentation alone (scale + translate + flip) on a uint8 batch on
the device, against the time of one ResNet-20 training step (forward, backward, optimizer) on such a batch: the
fraction of a step the augmentation costs. Also the integer-shift path (no scale: the fast94 setting) against the
same transform through the resampling matrices.

    STABILIZE_CIFAR10_DIR=/tmp/cifar10 python benchmarks/bench_gpu_throughput.py --part throughput
    python benchmarks/bench_gpu_throughput.py --part throughput --smoke        # CPU, tiny fake data, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.datamodules.augment import BatchAugment
from stabilize.models import ResNet
from stabilize.testing import random_cifar10_folder


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ImagesPerSecond(Callback):
    """Counts training images from step ``warmup`` on; the clock starts there (after a sync)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            synchronize()
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.images += len(batch[1])

    def rate(self) -> float:
        synchronize()
        return self.images / (time.perf_counter() - self.start)


def lightning_rate(args: argparse.Namespace, datamodule: CIFAR10DataModule, depth: int, monitor: bool) -> float:
    seed_everything(0, verbose=False)
    counter = ImagesPerSecond(args.warmup)
    callbacks: list[Callback] = [counter, *([GradientHealthCallback(verbose=False)] if monitor else [])]
    with tempfile.TemporaryDirectory() as logs:
        trainer = Trainer(
            accelerator=args.accelerator,
            devices=1,
            precision=args.precision,
            max_steps=args.steps + args.warmup,
            logger=TensorBoardLogger(logs),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            benchmark=True,
            callbacks=callbacks,
        )
        trainer.fit(ResNet(depth=depth, channels_last=True, scheduler="constant"), datamodule)
        return counter.rate()


def raw_rate(args: argparse.Namespace, datamodule: CIFAR10DataModule, depth: int) -> float:
    """The same work as the Lightning run, written out: batches, augmentation, autocast, SGD."""
    seed_everything(0, verbose=False)
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    network = ResNet(depth=depth).network.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = torch.bfloat16 if "bf16" in str(args.precision) else None
    batches = iter(datamodule.train_dataloader())
    images, start = 0, 0.0
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(datamodule.train_dataloader())
            x, y = next(batches)
        x, y = datamodule.transform_batch((x.to(device), y.to(device)), train=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(network(x.contiguous(memory_format=torch.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            images += len(y)
    synchronize()
    return images / (time.perf_counter() - start)


def throughput(args: argparse.Namespace, datamodule: CIFAR10DataModule) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for depth in args.depths:
        rates: dict[str, list[float]] = {"lightning": [], "lightning_callback": [], "raw": []}
        for round_ in range(args.rounds):
            rates["lightning"].append(lightning_rate(args, datamodule, depth, monitor=False))
            rates["lightning_callback"].append(lightning_rate(args, datamodule, depth, monitor=True))
            rates["raw"].append(raw_rate(args, datamodule, depth))
            print(f"resnet{depth} round {round_}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()))
        median = {name: statistics.median(values) for name, values in rates.items()}
        results[f"resnet{depth}"] = {
            "images_per_s": median,
            "all_images_per_s": rates,
            "lightning_over_raw_time": median["raw"] / median["lightning"],
            "callback_over_no_callback_time": median["lightning"] / median["lightning_callback"],
        }
        print(
            f"resnet{depth} ({args.precision}, channels_last, batch {args.batch_size}): time ratio Lightning/raw"
            f" {results[f'resnet{depth}']['lightning_over_raw_time']:.3f}, callback/no callback"
            f" {results[f'resnet{depth}']['callback_over_no_callback_time']:.3f}",
            flush=True,
        )
    return results


def device_seconds(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after two warm-up calls), synchronised around each."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def augment_cost(args: argparse.Namespace, datamodule: CIFAR10DataModule) -> dict[str, Any]:
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    images = datamodule.split("train")[0][: args.batch_size].to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    augment = datamodule.augmentation
    augment_s = device_seconds(lambda: augment(images, generator), args.repeats)

    network = ResNet(depth=20).network.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = augment(images, generator).contiguous(memory_format=torch.channels_last)
    y = datamodule.split("train")[1][: args.batch_size].to(device)
    dtype = torch.bfloat16 if "bf16" in str(args.precision) else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    torch.backends.cudnn.benchmark = True
    step_s = device_seconds(step, args.repeats)
    paths = {
        "integer_shift_fast_path": BatchAugment(scale=None, translate=4, flip=True),
        "resampling_matrices": BatchAugment(scale=(1.0, 1.000001), translate=4, flip=True),
    }
    path_rates = {
        name: args.batch_size / device_seconds(lambda a=a: a(images, generator), args.repeats)
        for name, a in paths.items()
    }
    results = {
        "batch_size": args.batch_size,
        "augment_images_per_s": args.batch_size / augment_s,
        "augment_ms_per_batch": 1e3 * augment_s,
        "resnet20_step_ms": 1e3 * step_s,
        "augment_fraction_of_step": augment_s / step_s,
        "shift_paths_images_per_s": path_rates,
        "integer_shift_over_matrices_speed": path_rates["integer_shift_fast_path"] / path_rates["resampling_matrices"],
    }
    print(
        f"augmentation (scale+translate+flip, batch {args.batch_size}): {results['augment_images_per_s']:.0f} img/s,"
        f" {results['augment_ms_per_batch']:.3f} ms per batch = {100 * results['augment_fraction_of_step']:.1f}% of a"
        f" ResNet-20 step ({results['resnet20_step_ms']:.2f} ms); integer-shift path"
        f" {results['integer_shift_over_matrices_speed']:.2f}x the matrices"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["throughput", "augment"], required=True)
    parser.add_argument("--data-dir", default=os.environ.get("STABILIZE_CIFAR10_DIR"))
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=100, help="augment: timed calls per figure")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny fake data, a few steps: checks the script")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.data_dir = str(random_cifar10_folder(Path(tmp) / "fake", num_train=256, num_test=32))
            args.accelerator, args.precision, args.batch_size = "cpu", "32-true", 32
            args.steps, args.warmup, args.rounds, args.repeats, args.depths = 2, 1, 1, 2, [20]
        elif not args.data_dir:
            parser.error("no CIFAR-10: pass --data-dir or set STABILIZE_CIFAR10_DIR (or use --smoke)")
        datamodule = CIFAR10DataModule(
            args.data_dir, batch_size=args.batch_size, val_size=0, drop_last=True, device="cuda"
        )
        datamodule.setup()
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "augmentation": "scale (0.9, 1.1), translate 4, flip",
        }
        if args.part == "throughput":
            results["throughput"] = throughput(args, datamodule)
        else:
            results["augment"] = augment_cost(args, datamodule)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
