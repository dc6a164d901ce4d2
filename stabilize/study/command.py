"""``stabilize study``: run a grid of experiments and write its report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from stabilize.errors import check_writable_folder
from stabilize.study.grid import BUDGETS, load_grid
from stabilize.study.runner import run_study


def study_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stabilize study",
        description=(
            "Train every run of a grid (configs/study/*.yaml) with GradientHealthCallback and TensorBoard, and write"
            " report.md, results.json, results.csv and plots. Finished runs are reused, so a killed study restarts"
            " where it stopped."
        ),
    )
    parser.add_argument("--config", required=True, help="the grid YAML, e.g. configs/study/quickstart.yaml")
    parser.add_argument(
        "--budget", default="cpu-small", help=f"data and epochs per run: {', '.join(BUDGETS)} (or one the grid defines)"
    )
    parser.add_argument("--out", help="output folder (default: studies/<grid>-<budget>)")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: $STABILIZE_CIFAR10_DIR, else ./data)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    return parser


def study_main(args: Sequence[str]) -> None:
    options = study_parser().parse_args(list(args))
    grid = load_grid(options.config)
    out = Path(options.out or Path("studies") / f"{grid.name}-{options.budget}")
    check_writable_folder(out, "--out")
    command = " ".join(["stabilize study", *args])
    run_study(grid, options.budget, out, data_dir=options.data_dir, accelerator=options.accelerator, command=command)
