"""Time to 94%: FastCNN under Lightning (with GradientHealthCallback) versus airbench94, same GPU, same data.

Part 1, time to accuracy. For each seed: ``configs/fast94.yaml`` (FastCNN + CIFAR10DataModule with the whole
uint8 dataset on the GPU) trains under Lightning's Trainer with GradientHealthCallback attached; the clock runs from
the start of ``fit`` to the end of ``test`` (the final test accuracy), with the data already on the GPU. A first,
short run compiles and warms up; its time is reported separately. Then airbench94 (PyPI ``airbench`` 0.1.8, carried
as a wheel to the GPU machine) trains on the very same tensors, written in its own ``train.pt``/``test.pt`` format,
timed the same way after its own warm-up. Reported: mean and standard deviation of test accuracy and of wall time,
and the time ratio (ours / airbench).

Part 2, throughput: ResNet-20 and ResNet-56 training images/s in bf16 with channels_last under Lightning versus a
raw PyTorch loop over the same GPU-resident, augmented batches.

    STABILIZE_CIFAR10_DIR=/tmp/cifar10 python benchmarks/bench_time_to_accuracy.py --seeds 5      # on a GPU
    python benchmarks/bench_time_to_accuracy.py --smoke                                           # CPU, seconds
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
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import FastCNN, ResNet
from stabilize.testing import random_cifar10_folder

REPO = Path(__file__).resolve().parents[1]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fast94_settings(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    config = yaml.safe_load(path.read_text())
    return config["model"]["init_args"], config["data"]["init_args"], config["trainer"]


def make_trainer(args: argparse.Namespace, trainer_config: dict[str, Any], **overrides: Any) -> Trainer:
    settings = {
        "accelerator": args.accelerator,
        "devices": 1,
        "precision": args.precision,
        "max_epochs": trainer_config["max_epochs"],
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "callbacks": [GradientHealthCallback(verbose=False)],
    }
    return Trainer(**{**settings, **overrides})


def lightning_run(
    seed: int,
    args: argparse.Namespace,
    datamodule: CIFAR10DataModule,
    model_args: dict[str, Any],
    trainer_config: dict[str, Any],
    **overrides: Any,
) -> tuple[float, float]:
    seed_everything(seed, verbose=False)
    model = FastCNN(**model_args)
    trainer = make_trainer(args, trainer_config, **overrides)
    synchronize()
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    result = trainer.test(model, datamodule, verbose=False)
    synchronize()
    return result[0]["test/acc"], time.perf_counter() - start


def airbench_runs(args: argparse.Namespace, tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    try:
        import airbench
    except ImportError:
        return {"skipped": "airbench is not installed (pip install airbench==0.1.8)"}
    if not torch.cuda.is_available():
        return {"skipped": "airbench94 needs a CUDA GPU"}
    classes = list(CIFAR10DataModule.classes)
    for split in ("train", "test"):  # airbench's own cache format: uint8 NHWC images
        torch.save(
            {
                "images": tensors[f"{split}_x"].permute(0, 2, 3, 1).contiguous(),
                "labels": tensors[f"{split}_y"],
                "classes": classes,
            },
            folder / f"{split}.pt",
        )
    loader = airbench.CifarLoader(
        str(folder), train=True, batch_size=1024, aug={"flip": True, "translate": 2}, altflip=True
    )
    start = time.perf_counter()
    airbench.warmup94(loader, verbose=False)
    synchronize()
    warmup = time.perf_counter() - start
    accuracies, times = [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        synchronize()
        start = time.perf_counter()
        accuracy = airbench.train94(loader, run=seed, verbose=False)
        synchronize()
        times.append(time.perf_counter() - start)
        accuracies.append(float(accuracy))
    return {"warmup_s": warmup, **describe(accuracies, times)}


def describe(accuracies: list[float], times: list[float]) -> dict[str, Any]:
    spread = statistics.stdev if len(times) > 1 else (lambda values: 0.0)
    return {
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_std": spread(accuracies),
        "time_mean_s": statistics.mean(times),
        "time_std_s": spread(times),
        "accuracies": accuracies,
        "times_s": times,
    }


# ------------------------------------------------------------------------------------------------- throughput
class ImagesPerSecond(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start = warmup, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            synchronize()
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.images += len(batch[1])

    def rate(self) -> float:
        synchronize()
        return self.images / (time.perf_counter() - self.start)


def throughput(args: argparse.Namespace, datamodule: CIFAR10DataModule, depth: int) -> dict[str, float]:
    steps, warmup = args.throughput_steps, args.throughput_warmup
    seed_everything(0, verbose=False)
    counter = ImagesPerSecond(warmup)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[counter],
    )
    trainer.fit(ResNet(depth=depth, channels_last=True, scheduler="constant"), datamodule)
    lightning_rate = counter.rate()

    seed_everything(0, verbose=False)
    device = torch.device("cuda" if args.accelerator == "gpu" or torch.cuda.is_available() else "cpu")
    network = ResNet(depth=depth).network.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = torch.bfloat16 if "bf16" in str(args.precision) else None
    batches = iter(datamodule.train_dataloader())
    images = 0
    for step in range(steps + warmup):
        if step == warmup:
            synchronize()
            start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(datamodule.train_dataloader())
            x, y = next(batches)
        x, y = datamodule.transform_batch((x.to(device), y.to(device)), train=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(network(x.contiguous(memory_format=torch.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            images += len(y)
    synchronize()
    raw_rate = images / (time.perf_counter() - start)
    return {"lightning_images_per_s": lightning_rate, "raw_images_per_s": raw_rate, "ratio": lightning_rate / raw_rate}


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("STABILIZE_CIFAR10_DIR"))
    parser.add_argument("--config", default=str(REPO / "configs" / "fast94.yaml"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--throughput-steps", type=int, default=100)
    parser.add_argument("--throughput-warmup", type=int, default=20)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny fake data, a few steps: checks the script")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model_args, data_args, trainer_config = fast94_settings(Path(args.config))
    overrides: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.data_dir = str(random_cifar10_folder(Path(tmp) / "fake", num_train=640, num_test=128))
            args.seeds, args.accelerator, args.precision = 1, "cpu", "32-true"
            args.throughput_steps, args.throughput_warmup = 2, 1
            model_args = {**model_args, "widths": [8, 16, 16], "compile": False}
            data_args = {**data_args, "batch_size": 16}
            overrides = {"max_steps": 3}
        elif not args.data_dir:
            parser.error("no CIFAR-10: pass --data-dir or set STABILIZE_CIFAR10_DIR (or use --smoke)")
        data_args = {**data_args, "data_dir": args.data_dir}
        datamodule = CIFAR10DataModule(**data_args)
        datamodule.setup()
        device = str(datamodule._splits["train"].images.device)
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "data_on": device,
            "precision": args.precision,
        }

        start = time.perf_counter()
        lightning_run(0, args, datamodule, model_args, trainer_config, max_steps=overrides.get("max_steps", 10))
        results["lightning_warmup_s"] = time.perf_counter() - start
        accuracies, times = [], []
        for seed in range(args.seeds):
            accuracy, seconds = lightning_run(seed, args, datamodule, model_args, trainer_config, **overrides)
            accuracies.append(accuracy)
            times.append(seconds)
            print(f"lightning FastCNN seed {seed}: test acc {accuracy:.4f} in {seconds:.2f} s", flush=True)
        results["lightning_fast94"] = describe(accuracies, times)
        results["airbench94"] = airbench_runs(args, datamodule.load_tensors(), Path(tmp))
        if "time_mean_s" in results["airbench94"]:
            results["time_ratio"] = results["lightning_fast94"]["time_mean_s"] / results["airbench94"]["time_mean_s"]
        if not args.skip_throughput:
            results["throughput"] = {f"resnet{d}": throughput(args, datamodule, d) for d in (20, 56)}

    ours = results["lightning_fast94"]
    print(
        f"\nFastCNN under Lightning ({args.seeds} seeds, {results['device']}, data on {device}):"
        f" acc {ours['accuracy_mean']:.4f} +- {ours['accuracy_std']:.4f},"
        f" time {ours['time_mean_s']:.2f} +- {ours['time_std_s']:.2f} s (warm-up {results['lightning_warmup_s']:.1f} s)"
    )
    airbench = results["airbench94"]
    if "skipped" in airbench:
        print(f"airbench94: skipped ({airbench['skipped']})")
    else:
        print(
            f"airbench94: acc {airbench['accuracy_mean']:.4f} +- {airbench['accuracy_std']:.4f},"
            f" time {airbench['time_mean_s']:.2f} +- {airbench['time_std_s']:.2f} s;"
            f" time ratio ours/airbench {results['time_ratio']:.2f}"
        )
    for name, figures in results.get("throughput", {}).items():
        print(
            f"{name} ({args.precision}, channels_last): Lightning {figures['lightning_images_per_s']:.0f} img/s,"
            f" raw loop {figures['raw_images_per_s']:.0f} img/s, ratio {figures['ratio']:.3f}"
        )
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
