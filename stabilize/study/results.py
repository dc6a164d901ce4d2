"""What one study run measured, as a plain record (saved as ``result.json`` beside the run's logs)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, TypedDict

from stabilize.callbacks import GradientHealthCallback
from stabilize.health import HealthSummary, judge_saved, verdict
from stabilize.study.recorder import StudyRecorder


class RunResult(TypedDict):
    name: str
    model: str
    final_train_loss: float | None
    train_acc: float | None
    val_acc: float | None
    val_loss: float | None
    best_val_acc: float | None
    best_epoch: int | None
    test_acc: float | None
    test_loss: float | None
    wall_time_s: float
    steps: int
    median_grad_norm: float | None
    max_grad_norm: float | None
    worst_depth_ratio: float | None
    vanishing_layers_end: int
    num_layers: int
    exploding_steps: int
    verdict: str
    #: The run's model arguments as the grid gives them (defaults of the class left out).
    model_args: dict[str, Any]
    #: ``diagnosis()`` of the run's other monitors (ForwardStatisticsMonitor, SharpnessMonitor), by class name.
    diagnoses: dict[str, str]
    curves: dict[str, Any]


#: The printed and reported table's columns, as README shows them: (key, header, format). ``results.csv`` adds
#: `EXTRA_COLUMNS`; ``results.json`` holds every field.
COLUMNS = (
    ("name", "run", "{}"),
    ("test_acc", "test acc", "{:.1%}"),
    ("val_acc", "val acc", "{:.1%}"),
    ("final_train_loss", "train loss", "{:.3f}"),
    ("wall_time_s", "time", "{:.0f} s"),
    ("worst_depth_ratio", "worst depth ratio", "{:.2g}"),
    ("vanishing_layers_end", "vanishing at end", "{}"),
    ("exploding_steps", "exploding steps", "{}"),
    ("verdict", "verdict", "{}"),
)
#: Shown after "val acc" when some run has no test accuracy but a loss (a regression or a language model).
LOSS_COLUMNS = (
    ("val_loss", "val loss", "{:.4g}"),
    ("test_loss", "test loss", "{:.4g}"),
)
EXTRA_COLUMNS = (
    ("train_acc", "train acc", "{:.1%}"),
    *LOSS_COLUMNS,
    ("best_epoch", "best epoch", "{}"),
    ("steps", "steps", "{}"),
    ("median_grad_norm", "median grad norm", "{:.3g}"),
    ("max_grad_norm", "max grad norm", "{:.3g}"),
)


def verdict_fields(summary: HealthSummary | None) -> dict[str, Any]:
    """The result's fields that the verdict rules decide."""
    return {
        "exploding_steps": sum(e["steps"] for e in summary["explosions"]) if summary else 0,
        "verdict": verdict(summary) if summary else "no gradients recorded",
    }


def judged_again(result: RunResult, health_file: Path) -> RunResult:
    """``result`` with its verdict under the current rules, judged again from the run's saved
    ``gradient_health.json`` (its records and raw spike events; see `stabilize.health.judge_saved`): a study
    rerun after the rules changed reports every finished run as a new run would be, without training it again."""
    if not health_file.is_file():
        return result
    summary = judge_saved(json.loads(health_file.read_text())).get("optimizer_0")
    return {**result, **verdict_fields(summary)}  # type: ignore[typeddict-item]


def collect(
    name: str,
    model: str,
    recorder: StudyRecorder,
    health: GradientHealthCallback,
    train_acc: float | None,
    test_acc: float | None,
    steps: int,
    test_loss: float | None = None,
    model_args: dict[str, Any] | None = None,
    diagnoses: dict[str, str] | None = None,
) -> RunResult:
    summary = health.summary().get("optimizer_0")
    history = health.history
    norms = [r["global_norm"] for r in history if math.isfinite(r["global_norm"])]
    # The largest norm of each logging interval, not only the logged step's: spikes between records count.
    peaks = [r["max_norm"] for r in history if math.isfinite(r.get("max_norm", math.nan))]
    best = max(recorder.val_acc, key=lambda item: item[2], default=None)
    last = history[-1] if history else None
    test_points = [*recorder.test_acc, *([(steps, test_acc)] if test_acc is not None else [])]
    return {
        "name": name,
        "model": model,
        "final_train_loss": recorder.epoch_loss[-1] if recorder.epoch_loss else None,
        "train_acc": train_acc,
        "val_acc": recorder.val_acc[-1][2] if recorder.val_acc else None,
        "val_loss": recorder.val_loss[-1][2] if recorder.val_loss else None,
        "best_val_acc": best[2] if best else None,
        "best_epoch": best[1] if best else None,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "wall_time_s": recorder.wall_time,
        "steps": steps,
        "median_grad_norm": statistics.median(norms) if norms else None,
        "max_grad_norm": max(norms + peaks) if norms or peaks else None,
        "worst_depth_ratio": summary["worst_depth_ratio"]["ratio"]
        if summary and summary["worst_depth_ratio"]
        else None,
        "vanishing_layers_end": len(summary["vanishing_layers_now"]) if summary else 0,
        "num_layers": summary["num_layers"] if summary else 0,
        **verdict_fields(summary),  # type: ignore[typeddict-item]
        "model_args": dict(model_args or {}),
        "diagnoses": dict(diagnoses or {}),
        "curves": {
            "train_loss": recorder.train_loss,
            "val_acc": [(step, acc) for step, _, acc in recorder.val_acc],
            "val_loss": [(step, loss) for step, _, loss in recorder.val_loss],
            "test_acc": test_points,
            "global_norm": [(r["step"], r["global_norm"]) for r in history],
            "global_norm_max": [(r["step"], r.get("max_norm", r["global_norm"])) for r in history],
            "final_layers": list(last["layers"]) if last else [],
            "final_layer_norms": [stats["grad_norm"] for stats in last["layers"].values()] if last else [],
        },
    }


def cell(result: RunResult, key: str, form: str) -> str:
    value = result.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return form.format(value)
