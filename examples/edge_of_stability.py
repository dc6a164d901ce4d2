"""The Edge of Stability on this CPU (Cohen et al., ICLR 2021, Fig. 1): full-batch gradient descent on a
fully-connected tanh network, 5,000 CIFAR-10 images, square loss, at three learning rates. The sharpness (the
largest Hessian eigenvalue of the loss, SharpnessMonitor) rises until it reaches the stability limit 2 / lr and then
hovers there while the loss keeps falling, non-monotonically.

Writes ``<out>/edge_of_stability.png`` (sharpness over steps with the 2 / lr lines, and the loss), ``report.md``
(one row per learning rate) and ``results.json``.

    python examples/edge_of_stability.py --data-dir ../shared/cifar10 --out docs/results/edge-of-stability
    python examples/edge_of_stability.py --smoke     # random data, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stabilize.callbacks import GradientHealthCallback, SharpnessMonitor
from stabilize.datamodules.cifar10_files import standardized_training_images
from stabilize.errors import DataError


class FullyConnectedTanh(LightningModule):
    """Cohen et al.'s fc-tanh: two hidden layers of 200 tanh units, PyTorch's default init; full-batch gradient
    descent (SGD without momentum) on the square loss ``0.5 * |f(x) - onehot(y)|^2`` averaged over examples."""

    def __init__(self, lr: float, width: int = 200) -> None:
        super().__init__()
        self.lr = lr
        self.network = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * 32 * 32, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, 10),
        )
        self.losses: list[Tensor] = []  # every step's, kept on the device, read once at the end

    def sharpness_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The loss SharpnessMonitor measures (without the bookkeeping of a training step)."""
        x, y = batch
        return 0.5 * (self.network(x) - F.one_hot(y, 10).float()).square().sum(1).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.sharpness_loss(batch)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def cifar_subset(data_dir: str | None, size: int, smoke: bool) -> TensorDataset:
    """The first ``size`` training images, standardised per channel, or random ones for a smoke run."""
    if smoke:
        generator = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,)))
    try:
        return TensorDataset(*standardized_training_images(data_dir or "data", size))
    except DataError as error:
        raise SystemExit(f"{error} Pass it as --data-dir.") from None


def run_one(lr: float, data: TensorDataset, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(args.seed, verbose=False)
    model = FullyConnectedTanh(lr)
    # To 0.1% (the monitor's default is 1%), as the paper's figure; on the whole batch (the default too).
    sharpness = SharpnessMonitor(
        every_n_steps=args.every,
        iterations=args.iterations,
        tolerance=1e-3,
        examples=None,
        verbose=False,
        at_initialisation=True,
    )
    health = GradientHealthCallback(log_every_n_steps=args.every, verbose=False)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        callbacks=[health, sharpness],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=len(data)))  # one batch: full-batch gradient descent
    seconds = time.perf_counter() - start
    limit = 2 / lr
    losses = torch.stack(model.losses).tolist()
    history = [(step, value) for step, value, _ in sharpness.history]
    # "Reached" the limit: the first measurement within 10% of it; "hovering": the measurements after that one.
    reached = next((step for step, value in history if value >= 0.9 * limit), None)
    after = [value / limit for step, value in history if reached is not None and step > reached]
    return {
        "lr": lr,
        "limit": limit,
        "steps": len(losses),
        "seconds": round(seconds, 1),
        "sharpness": history,
        "loss": losses,
        # Before any update, and after the first one (the measurement of step 0, which depends on the LR).
        "initial_sharpness": sharpness.initial_sharpness,
        "after_first_update": history[0][1],
        "reached_limit_at": reached,
        "ratio_after_median": statistics.median(after) if after else None,
        "ratio_after_range": [min(after), max(after)] if after else None,
        "final_loss": losses[-1],
        "loss_rises": sum(b > a for a, b in itertools.pairwise(losses)),
        "diagnosis": sharpness.diagnosis(health.spike_steps()),
    }


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for result, color in zip(results, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        steps, values = zip(*result["sharpness"])
        top.plot(steps, values, color=color, label=f"lr {result['lr']:g}")
        top.axhline(result["limit"], color=color, linestyle="--", linewidth=1)
        bottom.plot(result["loss"], color=color, linewidth=1)
    top.set_ylabel("sharpness (dashed: 2 / lr)")
    top.legend()
    bottom.set_ylabel("training loss (square)")
    bottom.set_xlabel("step (full-batch gradient descent)")
    fig.suptitle("Edge of Stability: fc-tanh on 5,000 CIFAR-10 images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    rows = [
        "| lr | 2 / lr | sharpness at initialisation | after the first update | reached 90% of 2 / lr at step"
        " | sharpness / (2 / lr) after (median, range) | loss rises (steps) | final loss | time |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        after = (
            f"{r['ratio_after_median']:.2f} ({r['ratio_after_range'][0]:.2f}-{r['ratio_after_range'][1]:.2f})"
            if r["ratio_after_median"] is not None
            else "n/a"
        )
        rows.append(
            f"| {r['lr']:g} | {r['limit']:.0f} | {r['initial_sharpness']:.1f} | {r['after_first_update']:.1f}"
            f" | {r['reached_limit_at']} | {after}"
            f" | {r['loss_rises']} | {r['final_loss']:.4f} | {r['seconds']:.0f} s |"
        )
    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    return "\n".join(
        [
            "# The Edge of Stability on this CPU",
            "",
            f"Full-batch gradient descent, fc-tanh (200-200), {args.size:,} CIFAR-10 training images, square loss;"
            f" sharpness every {args.every} steps (Lanczos, warm-started, to a residual bound of 0.1%,"
            f" {args.iterations} Hessian-vector products at most)."
            f" Machine: {machine}. Date: {date.today().isoformat()}.",
            f"Command: `{command}`.",
            "",
            *rows,
            "",
            "![sharpness and loss](edge_of_stability.png)",
            "",
            *[f"- lr {r['lr']:g}: {r['diagnosis']}".replace("\n", " ") for r in results],
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("edge-of-stability"))
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.04, 0.08])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=25, help="steps between sharpness measurements")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="random data, 200 images, 20 steps")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.every, args.iterations = 200, 20, 5, 5
    command = "python examples/edge_of_stability.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v not in (None, False) and k != "smoke"
    )
    data = cifar_subset(args.data_dir, args.size, args.smoke)
    results = [run_one(lr, data, args) for lr in args.lrs]
    args.out.mkdir(parents=True, exist_ok=True)
    figure(results, args.out / "edge_of_stability.png")
    (args.out / "report.md").write_text(report(results, args, command))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results, args, command))


if __name__ == "__main__":
    main()
