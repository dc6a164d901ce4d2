"""The study's outputs: report.md, results.json, results.csv and the plots, rebuilt from every run's result."""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch

from stabilize.health.records import jsonable
from stabilize.study import plots
from stabilize.study.comparisons import one_argument_tables
from stabilize.study.grid import Budget, Grid
from stabilize.study.results import COLUMNS, EXTRA_COLUMNS, LOSS_COLUMNS, RunResult, cell

PLOTS = {
    "curves.png": plots.learning_curves,
    "gradient_flow.png": plots.gradient_flow,
    "global_norm.png": plots.global_norms,
}


def columns(results: Sequence[RunResult]) -> tuple[tuple[str, str, str], ...]:
    """README's columns; with the validation and test losses after "val acc" when some run has no test accuracy
    but a loss (a regression or a language model: its number is the loss); without a score column no run has."""
    shown: tuple[tuple[str, str, str], ...] = COLUMNS
    if any(r.get("test_acc") is None and any(r.get(key) is not None for key, _, _ in LOSS_COLUMNS) for r in results):
        at = [key for key, _, _ in COLUMNS].index("val_acc") + 1
        shown = COLUMNS[:at] + LOSS_COLUMNS + COLUMNS[at:]
    # A score no run has (accuracy of language models, a test loss without a test split) is left out.
    scores = {"test_acc", "val_acc", "val_loss", "test_loss"}
    return tuple(c for c in shown if c[0] not in scores or any(r.get(c[0]) is not None for r in results))


def table(results: Sequence[RunResult], markdown: bool = True) -> str:
    """The results as a Markdown table (or aligned plain text for the console)."""
    shown = columns(results)
    rows = [[header for _, header, _ in shown]]
    rows += [[cell(result, key, form) for key, _, form in shown] for result in results]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(shown) - 1)) + "|---|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows)


def _diagnoses(results: Sequence[RunResult]) -> list[str]:
    """The other monitors' diagnoses (ForwardStatisticsMonitor, SharpnessMonitor), one bullet per run and monitor."""
    lines = [
        f"- {result['name']}, {monitor}: " + text.replace("\n", " ")
        for result in results
        for monitor, text in (result.get("diagnoses") or {}).items()
    ]
    return ["The runs' other monitors:", "", *lines, ""] if lines else []


def write_report(
    grid: Grid, budget_name: str, budget: Budget, results: Sequence[RunResult], out: Path, command: str | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(jsonable(list(results)), indent=1, allow_nan=False))
    with open(out / "results.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([key for key, _, _ in COLUMNS + EXTRA_COLUMNS] + ["best_val_acc", "model"])
        for result in results:
            values = [result.get(key) for key, _, _ in COLUMNS + EXTRA_COLUMNS]
            writer.writerow([*values, result["best_val_acc"], result["model"]])
    for filename, draw in PLOTS.items():
        draw(results, out / filename)
    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    subset = "all" if budget.train_subset is None else f"{budget.train_subset:,} (class-balanced)"
    lines = [
        f"# Study `{grid.name}` at budget `{budget_name}`",
        "",
        grid.description.strip(),
        "",
        f"Budget: {budget.max_epochs} epoch(s), training images: {subset}, validation: {budget.val_size:,},"
        f" test: the full test set. Seed {grid.seed}. Machine: {machine}. Date: {date.today().isoformat()}.",
        *([f"Command: `{command}`."] if command else []),
        "",
        table(results),
        "",
        "Columns: train loss = mean over the last epoch's (augmented) training batches; val acc = last epoch;"
        " worst depth ratio = smallest first-layer / last-layer gradient norm at GradientHealthCallback's records"
        f" (every {budget.log_every_n_steps} steps; below 1e-3: gradient vanishes toward the input); exploding"
        " steps = steps of confirmed explosions (a persistent run of spikes, or a spike the loss never recovered"
        " from, or one followed by non-finite gradients); verdict = the callback's one-line summary, transient"
        " spikes included. results.csv adds train accuracy, test loss, best epoch, steps and the median and largest"
        " gradient norm.",
        "",
        *one_argument_tables(results),
        *_diagnoses(results),
        "![learning curves](curves.png)",
        "",
        "![gradient flow](gradient_flow.png)",
        "",
        "![global gradient norm](global_norm.png)",
        "",
        *(
            ["![LR sensitivity](lr_sensitivity.png)", ""]
            if plots.lr_sensitivity(results, out / "lr_sensitivity.png")
            else []
        ),
    ]
    (out / "report.md").write_text("\n".join(lines))
