"""Augmented training images per second: CIFAR10DataModule versus torchvision's per-sample pipeline.

Both sides produce the same thing, augmented and normalized float32 training batches on ``--device``:

- ours: ``CIFAR10DataModule.train_dataloader()`` (uint8 batches by tensor indexing), the copy to the device, and
  the per-image augmentation that ``on_after_batch_transfer`` runs there (random scale, shift, flip, normalize);
- baseline: torchvision's own ``CIFAR10`` dataset (PIL images) with v2 ``RandomAffine(scale, translate)`` +
  ``RandomHorizontalFlip`` + ``ToDtype`` + ``Normalize`` per sample, in a ``DataLoader`` with the same batch size
  and ``num_workers``, then the copy to the device.

They run in one process, alternately (ours, baseline, ours, ...), and each figure is the median over the rounds,
because this machine's speed drifts. Ours covers one full epoch per round; the baseline is ~40x slower, so it
covers ``--baseline-batches`` batches per round (the rate is per image either way).

    python benchmarks/bench_datamodule.py --data-dir ../shared/cifar10            # real data
    python benchmarks/bench_datamodule.py --smoke                                # tiny fake data, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from stabilize.datamodules import CIFAR10_MEAN, CIFAR10_STD, BatchAugment, CIFAR10DataModule
from stabilize.testing import random_cifar10_folder


class OfflineCIFAR10(CIFAR10):
    """torchvision's CIFAR10, minus its md5s (offline copies are not byte-identical to the original)."""

    meta = {**CIFAR10.meta, "md5": None}

    def _check_integrity(self) -> bool:
        return True


def baseline_transform(scale: tuple[float, float], translate: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomAffine(degrees=0.0, translate=(translate / 32, translate / 32), scale=scale),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(datamodule: CIFAR10DataModule, device: torch.device) -> float:
    """Images per second over one full training epoch, augmentation on ``device`` included."""
    loader = datamodule.train_dataloader()
    images = 0
    synchronize(device)
    start = time.perf_counter()
    for batch in loader:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        x, y = datamodule.transform_batch((x, y), train=True)
        images += len(y)
    synchronize(device)
    return images / (time.perf_counter() - start)


def time_baseline(loader: DataLoader, device: torch.device, max_batches: int) -> float:
    images = 0
    iterator = iter(loader)
    next(iterator)  # worker start-up is not per-image work
    synchronize(device)
    start = time.perf_counter()
    for index, (x, y) in enumerate(iterator):
        if index == max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        images += len(y)
    synchronize(device)
    return images / (time.perf_counter() - start)


def run(args: argparse.Namespace, num_workers: int) -> dict[str, float | int | str]:
    device = torch.device(args.device)
    scale, translate = (0.9, 1.1), 4
    datamodule = CIFAR10DataModule(
        args.data_dir,
        batch_size=args.batch_size,
        num_workers=num_workers,
        val_size=args.val_size,
        scale=scale,
        translate=translate,
        flip=True,
        pin_memory=device.type == "cuda",
    )
    datamodule.setup()
    dataset = OfflineCIFAR10(str(datamodule.data_dir), train=True, transform=baseline_transform(scale, translate))
    baseline_loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    time_ours(datamodule, device)  # warm-up: allocator, generator, first-touch of the tensors
    ours, baseline = [], []
    for _ in range(args.rounds):
        ours.append(time_ours(datamodule, device))
        baseline.append(time_baseline(baseline_loader, device, args.baseline_batches))
    result = {
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "num_workers": num_workers,
        "train_images_per_epoch": datamodule.split_sizes()["train"],
        "rounds": args.rounds,
        "ours_images_per_s": round(statistics.median(ours)),
        "baseline_images_per_s": round(statistics.median(baseline)),
    }
    result["ratio"] = round(result["ours_images_per_s"] / result["baseline_images_per_s"], 1)
    return result


def time_augmentation_paths(device: torch.device, batch_size: int, rounds: int) -> dict[str, float]:
    """Images/s of the augmentation alone for integer shifts + flips (the fast94 setting): the indexing fast path
    against the same transform through the resampling matrices (a scale range 1e-6 wide forces that route). The two
    alternate call by call and each figure is the median over ``rounds * 50`` calls, so the machine's drift hits
    both alike."""
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    paths = {
        "integer_shift_fast_path": BatchAugment(scale=None, translate=4, flip=True),
        "resampling_matrices": BatchAugment(scale=(1.0, 1.000001), translate=4, flip=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for augment in paths.values():
        augment(images, generator)  # warm-up
    for _ in range(rounds * 50):
        for name, augment in paths.items():
            synchronize(device)
            start = time.perf_counter()
            augment(images, generator)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: round(batch_size / statistics.median(values)) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("STABILIZE_CIFAR10_DIR"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--num-workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="worker counts to compare; each is used by both sides",
    )
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-batches", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny fake data, one round: checks the script runs")
    parser.add_argument(
        "--augmentation-only", action="store_true", help="only the integer-shift fast path vs the resampling matrices"
    )
    args = parser.parse_args()
    if args.augmentation_only:
        print_augmentation_paths(torch.device(args.device), args.batch_size, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.data_dir = str(random_cifar10_folder(Path(tmp), num_train=320, num_test=64))
            args.val_size, args.rounds, args.baseline_batches, args.num_workers = 64, 1, 2, [0]
        elif not args.data_dir:
            parser.error("no CIFAR-10: pass --data-dir or set STABILIZE_CIFAR10_DIR (or use --smoke)")
        results = [run(args, workers) for workers in args.num_workers]
    print(
        f"{'num_workers':>11} {'ours img/s':>11} {'baseline img/s':>15} {'ratio':>6}   ({results[0]['device']},"
        f" batch {args.batch_size}, {torch.get_num_threads()} threads)"
    )
    for result in results:
        print(
            f"{result['num_workers']:>11} {result['ours_images_per_s']:>11} {result['baseline_images_per_s']:>15}"
            f" {result['ratio']:>5}x"
        )
    for result in results:
        print(json.dumps(result))
    print_augmentation_paths(torch.device(args.device), args.batch_size, args.rounds)


def print_augmentation_paths(device: torch.device, batch_size: int, rounds: int) -> None:
    paths = time_augmentation_paths(device, batch_size, rounds)
    ratio = paths["integer_shift_fast_path"] / paths["resampling_matrices"]
    print(f"augmentation alone, translate 4 + flip, batch {batch_size}, {device}: {paths} img/s ({ratio:.2f}x)")
    print(json.dumps({"augmentation_only": paths, "fast_path_ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
