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
    best = max((y for result in results for _, y in result["curves"]["test_acc"] if y is not None), default=0.9)
    loss_axis.set(xlabel="optimizer step", ylabel="training loss (smoothed)", title="Training loss")
    acc_axis.set(xlabel="optimizer step", ylabel="test accuracy", title="Test accuracy", ylim=(0, min(1.0, best + 0.1)))
    acc_axis.axhline(0.1, color="grey", linewidth=0.8, linestyle=":", label="chance (10%)")
    acc_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def gradient_flow(results: Sequence[RunResult], path: Path) -> None:
    """Each run's final layer gradient norms against relative depth (input 0, output 1), one log-scale axis: plain
    deep nets fall toward the input, normalized and residual ones stay flat."""
    figure = Figure(figsize=(8, 4.5), dpi=100)
    axis = figure.subplots()
    positive = [n for r in results for n in r["curves"]["final_layer_norms"] if n is not None and 0 < n < math.inf]
    floor = min(positive, default=1e-8) / 10
    for result in results:
        norms = result["curves"]["final_layer_norms"]
        if len(norms) < 2:
            continue
        depth = [i / (len(norms) - 1) for i in range(len(norms))]
        xs, ys = _positive(list(zip(depth, norms)))
        label = f"{result['name']} ({len(norms)} parameter layers)"
        (line,) = axis.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, label=label)
        # A log axis cannot show an exactly zero gradient: mark those layers on the bottom edge.
        zeros = [x for x, n in zip(depth, norms) if n == 0]
        if zeros:
            axis.scatter(zeros, [floor] * len(zeros), marker="x", color=line.get_color(), s=20, zorder=3)
    axis.set(
        xlabel="relative depth of the layer (0 = input, 1 = output)",
        ylabel="gradient L2 norm at the last record",
        title="Gradient flow at the end of training (x on the bottom edge: exactly zero)",
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
        (line,) = axis.plot(steps, norms, linewidth=1.0, label=result["name"])
        # The largest norm between two records: the spikes the verdict speaks of, which the logged steps miss.
        peak_steps, peaks = _positive(result["curves"].get("global_norm_max", []))
        axis.plot(peak_steps, peaks, linewidth=0.6, alpha=0.5, color=line.get_color())
    axis.set(
        xlabel="optimizer step",
        ylabel="global gradient norm",
        title="Global gradient norm at each record (faint: largest since the previous record)",
        yscale="log",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
