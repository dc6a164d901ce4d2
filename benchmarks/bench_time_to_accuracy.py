"""Time to 94%: FastCNN under Lightning (with GradientHealthCallback) versus airbench94, same GPU, same data.

``--part fast94``: for each seed, ``configs/fast94.yaml`` (FastCNN + CIFAR10DataModule with the whole uint8 dataset
on the GPU) trains under Lightning's Trainer with GradientHealthCallback attached; the clock runs from the start of
``fit`` to the end of ``test`` (the final test accuracy, with test-time augmentation). A first full run compiles
every graph (training with and without the whitening bias, evaluation) and is reported separately.

``--part airbench``: airbench94 (PyPI ``airbench`` 0.1.8, carried as a wheel to the GPU machine) on the very same
tensors, written in its own ``cifar10/{train,test}.pt`` format; the clock runs from the start of ``train94`` to the
end of its test-time-augmented evaluation, after one warm-up run. Run it in its own process: importing airbench
switches ``torch.backends.cudnn.benchmark`` on for the whole process.

``--part profile``: torch.profiler's top CUDA ops for one epoch of each (after a warm-up run).

    STABILIZE_CIFAR10_DIR=/tmp/cifar10 python benchmarks/bench_time_to_accuracy.py --part fast94 --seeds 5
    python benchmarks/bench_time_to_accuracy.py --part fast94 --smoke          # CPU, tiny fake data, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import FastCNN
from stabilize.testing import random_cifar10_folder

REPO = Path(__file__).resolve().parents[1]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


class Setup:
    """The fast94 configuration, the datamodule and the Trainer settings, shared by the parts."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        config = yaml.safe_load(Path(args.config).read_text())
        self.model_args: dict[str, Any] = config["model"]["init_args"]
        data_args: dict[str, Any] = config["data"]["init_args"]
        trainer_config = config["trainer"]
        self.trainer_args: dict[str, Any] = {
            "accelerator": "gpu" if torch.cuda.is_available() else "cpu",
            "devices": 1,
            "precision": trainer_config["precision"],
            "max_epochs": trainer_config["max_epochs"],
            "max_steps": trainer_config.get("max_steps", -1),
            "benchmark": True,
        }
        if args.smoke:
            args.data_dir = str(random_cifar10_folder(tmp / "fake", num_train=640, num_test=128))
            args.seeds = 1
            self.trainer_args.update(accelerator="cpu", precision="32-true", max_steps=14, max_epochs=2)
            self.model_args = {**self.model_args, "widths": [8, 16, 16], "compile": False, "whiten_bias_epochs": 1}
            data_args = {**data_args, "batch_size": 64}
        elif not args.data_dir:
            raise SystemExit("no CIFAR-10: pass --data-dir or set STABILIZE_CIFAR10_DIR (or use --smoke)")
        self.datamodule = CIFAR10DataModule(**{**data_args, "data_dir": args.data_dir})
        self.datamodule.setup()
        self.info = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "data_on": str(self.datamodule.split("train")[0].device),
            "precision": self.trainer_args["precision"],
            "train_images": len(self.datamodule.split("train")[1]),
        }

    def trainer(self, **overrides: Any) -> Trainer:
        settings = {
            **self.trainer_args,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "callbacks": [GradientHealthCallback(verbose=False)],
        }
        return Trainer(**{**settings, **overrides})

    def run(self, seed: int, **overrides: Any) -> tuple[float, float]:
        """Test accuracy and seconds from the start of ``fit`` to the end of ``test``."""
        seed_everything(seed, verbose=False)
        model = FastCNN(**self.model_args)
        trainer = self.trainer(**overrides)
        synchronize()
        start = time.perf_counter()
        trainer.fit(model, self.datamodule)
        result = trainer.test(model, self.datamodule, verbose=False)
        synchronize()
        return result[0]["test/acc"], time.perf_counter() - start


def fast94(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    accuracy, seconds = setup.run(100)
    results: dict[str, Any] = {"first_run_s": seconds, "first_run_accuracy": accuracy}
    print(f"fast94 first run (compiles): test acc {accuracy:.4f} in {seconds:.2f} s", flush=True)
    accuracies, times = [], []
    for seed in range(args.seeds):
        accuracy, seconds = setup.run(seed)
        accuracies.append(accuracy)
        times.append(seconds)
        print(f"fast94 seed {seed}: test acc {accuracy:.4f} in {seconds:.2f} s", flush=True)
    return {**results, **describe(accuracies, times)}


@contextlib.contextmanager
def airbench_folder(setup: Setup, tmp: Path) -> Iterator[Any]:
    """airbench reads ``./cifar10/{train,test}.pt`` (uint8 NHWC images) relative to the working directory."""
    import airbench

    folder = tmp / "airbench"
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images, labels = setup.datamodule.split(split)
        payload = {
            "images": images.permute(0, 2, 3, 1).contiguous().cpu(),
            "labels": labels.cpu(),
            "classes": list(CIFAR10DataModule.classes),
        }
        torch.save(payload, folder / "cifar10" / f"{split}.pt")
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield airbench
    finally:
        os.chdir(previous)


def airbench_loaders(airbench: Any) -> tuple[Any, Any]:
    train = airbench.CifarLoader(
        "cifar10", train=True, batch_size=1024, aug={"flip": True, "translate": 2}, altflip=True
    )
    return train, airbench.CifarLoader("cifar10", train=False, batch_size=2000)


def airbench94(args: argparse.Namespace, setup: Setup, tmp: Path) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "airbench94 needs a CUDA GPU"}
    with airbench_folder(setup, tmp) as airbench:
        train_loader, test_loader = airbench_loaders(airbench)

        def run(seed: int) -> tuple[float, float]:
            torch.manual_seed(seed)
            synchronize()
            start = time.perf_counter()
            model = airbench.train94(train_loader, run=seed, verbose=False)
            accuracy = airbench.evaluate(model, test_loader, tta_level=2)
            synchronize()
            return float(accuracy), time.perf_counter() - start

        accuracy, first_run_s = run(100)
        print(f"airbench94 first run: test acc {accuracy:.4f} in {first_run_s:.2f} s", flush=True)
        accuracies, times = [], []
        for seed in range(args.seeds):
            accuracy, seconds = run(seed)
            accuracies.append(accuracy)
            times.append(seconds)
            print(f"airbench94 seed {seed}: test acc {accuracy:.4f} in {seconds:.2f} s", flush=True)
    return {"first_run_s": first_run_s, **describe(accuracies, times)}


class ProfileOneEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch, self.profiler = epoch, torch.profiler.profile(activities=profiler_activities())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            synchronize()
            self.profiler.__enter__()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            synchronize()
            self.profiler.__exit__(None, None, None)


def profiler_activities() -> list[torch.profiler.ProfilerActivity]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def top_ops(profiler: torch.profiler.profile, rows: int) -> str:
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows)


def profile(args: argparse.Namespace, setup: Setup, tmp: Path) -> dict[str, Any]:
    """Top ops of one training epoch (the second: compiled graphs warm) of each, after a full warm-up run."""
    setup.run(100)
    spy = ProfileOneEpoch(epoch=1)
    seed_everything(0, verbose=False)
    setup.trainer(callbacks=[GradientHealthCallback(verbose=False), spy]).fit(
        FastCNN(**setup.model_args), setup.datamodule
    )
    tables = {"fast94_lightning": top_ops(spy.profiler, args.rows)}
    if torch.cuda.is_available():
        with airbench_folder(setup, tmp) as airbench:
            train_loader, _ = airbench_loaders(airbench)
            airbench.train94(train_loader, run=100, verbose=False)
            with torch.profiler.profile(activities=profiler_activities()) as profiler:
                airbench.train94(train_loader, epochs=1, run=0, verbose=False)
                synchronize()
            tables["airbench94"] = top_ops(profiler, args.rows)
    for name, table in tables.items():
        print(f"\n== {name}: one epoch, top ops by self device time\n{table}", flush=True)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["fast94", "airbench", "profile"], required=True)
    parser.add_argument("--data-dir", default=os.environ.get("STABILIZE_CIFAR10_DIR"))
    parser.add_argument("--config", default=str(REPO / "configs" / "fast94.yaml"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25, help="profile: rows of each top-ops table")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny fake data, a few steps: checks the script")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        setup = Setup(args, tmp)
        results: dict[str, Any] = dict(setup.info)
        if args.part == "fast94":
            results["fast94_lightning"] = ours = fast94(args, setup)
            print(
                f"\nFastCNN fast94 under Lightning + GradientHealthCallback ({args.seeds} seeds, {results['device']}):"
                f" acc {ours['accuracy_mean']:.4f} +- {ours['accuracy_std']:.4f},"
                f" time {ours['time_mean_s']:.2f} +- {ours['time_std_s']:.2f} s (first run {ours['first_run_s']:.1f} s)"
            )
        elif args.part == "airbench":
            results["airbench94"] = theirs = airbench94(args, setup, tmp)
            if "skipped" not in theirs:
                print(
                    f"\nairbench94 ({args.seeds} seeds):"
                    f" acc {theirs['accuracy_mean']:.4f} +- {theirs['accuracy_std']:.4f},"
                    f" time {theirs['time_mean_s']:.2f} +- {theirs['time_std_s']:.2f} s"
                )
        else:
            results["profile"] = profile(args, setup, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
