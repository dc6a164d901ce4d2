"""The study's pictures, as PNG files: learning curves, the gradient-flow picture and the global norm over steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from stabilize.study.results import RunResult


def _positive(points: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    kept = [(x, y) for x, y in points if y is not None and math.isfinite(y) and y > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def learning_curves(results: Sequence[RunResult], path: Path) -> None:
    """Training loss (per step, smoothed over ~2% of the run) and test accuracy over optimizer steps."""
    figure = Figure(figsize=(11, 4.2), dpi=100)
    loss_axis, acc_axis = figure.subplots(1, 2)
    for result in results:
        steps, losses = _positive(result["curves"]["train_loss"])
        window = max(1, len(losses) // 50)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        (line,) = loss_axis.plot(steps, smooth, linewidth=1.2, label=result["name"])
        test_steps, accuracies = _positive(result["curves"]["test_acc"])
        acc_axis.plot(test_steps, accuracies, marker="o", markersize=3, color=line.get_color(), label=result["name"])
    loss_axis.set(xlabel="optimizer step", ylabel="training loss", title="Training loss", yscale="log")
    acc_axis.set(xlabel="optimizer step", ylabel="test accuracy", title="Test accuracy", ylim=(0, 1))
    acc_axis.axhline(0.1, color="grey", linewidth=0.8, linestyle=":", label="chance (10%)")
    acc_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def gradient_flow(results: Sequence[RunResult], path: Path) -> None:
    """Each run's final layer gradient norms against relative depth (input 0, output 1), one log-scale axis: plain
    deep nets fall toward the input, normalized and residual ones stay flat."""
    figure = Figure(figsize=(8, 4.5), dpi=100)
    axis = figure.subplots()
    for result in results:
        norms = result["curves"]["final_layer_norms"]
        if len(norms) < 2:
            continue
        depth = [i / (len(norms) - 1) for i in range(len(norms))]
        xs, ys = _positive(list(zip(depth, norms)))
        axis.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, label=f"{result['name']} ({len(norms)} layers)")
    axis.set(
        xlabel="relative depth of the layer (0 = input, 1 = output)",
        ylabel="gradient L2 norm at the last record",
        title="Gradient flow at the end of training",
        yscale="log",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def global_norms(results: Sequence[RunResult], path: Path) -> None:
    figure = Figure(figsize=(8, 4), dpi=100)
    axis = figure.subplots()
    for result in results:
        steps, norms = _positive(result["curves"]["global_norm"])
        axis.plot(steps, norms, linewidth=1.0, label=result["name"])
    axis.set(xlabel="optimizer step", ylabel="global gradient norm", title="Global gradient norm", yscale="log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
