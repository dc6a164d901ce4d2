"""``stabilize study``: run a grid of experiments and write its report."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from stabilize.datamodules.cifar10 import ENV_DATA_DIR, FOLDER
from stabilize.datamodules.text import DEFAULT_FILE, ENV_TEXT_DIR
from stabilize.errors import DataNotFoundError, check_writable_folder
from stabilize.shipped import shipped_names
from stabilize.study.grid import BUDGETS, load_grid
from stabilize.study.runner import run_study


def study_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stabilize study",
        description=(
            "Train every run of a grid (a shipped one by name, or a YAML) with GradientHealthCallback and TensorBoard,"
            " and write"
            " report.md, results.json, results.csv and plots. Finished runs are reused, so a killed study restarts"
            " where it stopped."
        ),
    )
    parser.add_argument(
        "grid", nargs="?", help=f"a shipped grid's name ({', '.join(shipped_names('study'))}) or a grid YAML"
    )
    parser.add_argument("--config", help="the same as GRID (kept for scripts): a shipped grid's name or a YAML path")
    parser.add_argument(
        "--budget", default="cpu-small", help=f"data and epochs per run: {', '.join(BUDGETS)} (or one the grid defines)"
    )
    parser.add_argument(
        "--runs",
        help="comma-separated run names or shell patterns to train (default: the budget's runs, else all)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a dry run: every run for 3 batches on whatever data there is (check a grid before a long or GPU run)",
    )
    parser.add_argument("--out", help="output folder (default: studies/<grid>-<budget>[-smoke])")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: $STABILIZE_CIFAR10_DIR, else ./data)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    return parser


def study_main(args: Sequence[str]) -> None:
    parser = study_parser()
    options = parser.parse_args(list(args))
    if (options.grid is None) == (options.config is None):
        parser.error("name one grid: `stabilize study quickstart` or `--config <grid.yaml>`")
    grid = load_grid(options.grid or options.config)
    if options.smoke:
        grid = grid.smoke(options.budget)
    out = Path(options.out or Path("studies") / f"{grid.name}-{options.budget}{'-smoke' if options.smoke else ''}")
    check_writable_folder(out, "--out")
    command = " ".join(["stabilize study", *args])
    # The topmost folder this study will create, removed again if the study fails before writing any file into it.
    created = out if not out.exists() else None
    while created is not None and not created.parent.exists():
        created = created.parent
    try:
        runs = None if options.runs is None else [p.strip() for p in options.runs.split(",") if p.strip()]
        run_study(grid, options.budget, out, options.data_dir, options.accelerator, command=command, runs=runs)
    except DataNotFoundError as error:
        raise DataNotFoundError(
            f"{error.searched} Point the study at its data: the folder holding {FOLDER}/ with --data-dir (or"
            f" ${ENV_DATA_DIR}); a text grid's file with ${ENV_TEXT_DIR} (the folder holding {DEFAULT_FILE})."
        ) from error
    finally:
        if created is not None and created.is_dir() and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created)  # a study that failed before its first run leaves no empty folders behind
