"""The study's pictures, as PNG files: learning curves, the gradient-flow picture and the global norm over steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from stabilize.study.results import RunResult


def _positive(points: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    kept = [(x, y) for x, y in points if y is not None and math.isfinite(y) and y > 0]
    return [x for x, _ in kept], [y for _, y in kept]


def _mark_on_edge(axis: Any, line: Any, xs: Sequence[float], edge: float, size: float) -> None:
    """Points the axis cannot show (an exact zero on a log axis, a loss that is not finite) as x markers at ``edge``,
    in the colour of their line."""
    if xs:
        axis.scatter(xs, [edge] * len(xs), marker="x", color=line.get_color(), s=size, zorder=3)


def _finish(figure: Figure, axis: Any, path: Path, **settings: Any) -> None:
    """Label the axis, add its legend and write the figure."""
    axis.set(**settings)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


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
        _mark_on_edge(axis, line, [x for x, n in zip(depth, norms) if n == 0], floor, size=20)
    _finish(
        figure,
        axis,
        path,
        xlabel="relative depth of the layer (0 = input, 1 = output)",
        ylabel="gradient L2 norm at the last record",
        title="Gradient flow at the end of training (x on the bottom edge: exactly zero)",
        yscale="log",
    )


def global_norms(results: Sequence[RunResult], path: Path) -> None:
    figure = Figure(figsize=(8, 4), dpi=100)
    axis = figure.subplots()
    for result in results:
        steps, norms = _positive(result["curves"]["global_norm"])
        (line,) = axis.plot(steps, norms, linewidth=1.0, label=result["name"])
        # The largest norm between two records: the spikes the verdict speaks of, which the logged steps miss.
        peak_steps, peaks = _positive(result["curves"].get("global_norm_max", []))
        axis.plot(peak_steps, peaks, linewidth=0.6, alpha=0.5, color=line.get_color())
    _finish(
        figure,
        axis,
        path,
        xlabel="optimizer step",
        ylabel="global gradient norm",
        title="Global gradient norm at each record (faint: largest since the previous record)",
        yscale="log",
    )


def lr_groups(results: Sequence[RunResult]) -> dict[str, list[tuple[float, RunResult]]]:
    """Runs that differ only in their learning rate (``model_args["lr"]``), grouped, each group sorted by LR and
    labelled by what sets it apart from the other groups (the model arguments that vary between groups, else the
    model's name). Only groups of two or more learning rates."""
    keyed: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, RunResult]]] = {}
    for result in results:
        args = result.get("model_args") or {}
        if "lr" not in args:
            continue
        settings = tuple(sorted((k, str(v)) for k, v in args.items() if k != "lr"))
        keyed.setdefault((result["model"], settings), []).append((float(args["lr"]), result))
    groups = {key: sorted(runs, key=lambda item: item[0]) for key, runs in keyed.items() if len(runs) >= 2}
    settings_of = {key: dict(key[1]) for key in groups}
    varying = sorted(
        {k for own in settings_of.values() for k in own if any(o.get(k) != own.get(k) for o in settings_of.values())}
    )
    labelled = {}
    for key, runs in groups.items():
        own = settings_of[key]
        label = ", ".join(f"{k}={own.get(k, 'default')}" for k in varying) or key[0].rsplit(".", 1)[-1]
        labelled[label] = runs
    return labelled


def lr_sensitivity(results: Sequence[RunResult], path: Path) -> bool:
    """Final validation loss against the learning rate, one line per group of runs that differ only in it (Wortsman
    et al. 2023's "LR sensitivity"); a run whose loss is not finite is marked on the top edge. Returns whether there
    was anything to draw (no file otherwise)."""
    groups = lr_groups(results)
    if not groups:
        return False
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axis = figure.subplots()
    losses = [r.get("val_loss") for runs in groups.values() for _, r in runs]
    finite = [float(v) for v in losses if v is not None and math.isfinite(v)]
    top = max(finite, default=1.0) * 1.1
    for label, runs in groups.items():
        points = [(lr, r.get("val_loss")) for lr, r in runs]
        kept = [(lr, v) for lr, v in points if v is not None and math.isfinite(v)]
        (line,) = axis.plot([lr for lr, _ in kept], [v for _, v in kept], marker="o", label=label)
        _mark_on_edge(axis, line, [lr for lr, v in points if v is None or not math.isfinite(v)], top, size=40)
    _finish(
        figure,
        axis,
        path,
        xscale="log",
        xlabel="peak learning rate",
        ylabel="final validation loss",
        title="LR sensitivity (x on the top edge: the loss was not finite)",
    )
    return True
