"""Run a study grid: each run once (finished runs are reused), then the report."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from stabilize.callbacks import GradientHealthCallback, InterruptCheckpoint, LineProgress
from stabilize.health.records import jsonable
from stabilize.study.grid import Budget, Grid, RunSpec, check_runs, data_arguments
from stabilize.study.recorder import StudyRecorder
from stabilize.study.report import table, write_report
from stabilize.study.results import RunResult, collect, judged_again

RESULT_FILE = "result.json"
HEALTH_FILE = "gradient_health.json"
#: The checkpoint a run killed by SIGTERM or Ctrl+C leaves in its folder; the study's rerun continues from it.
INTERRUPTED = "interrupted.ckpt"


def run_study(
    grid: Grid,
    budget_name: str,
    out: Path,
    data_dir: str | None = None,
    accelerator: str = "auto",
    echo: Callable[[str], None] = print,
    command: str | None = None,
    runs: Sequence[str] | None = None,
) -> list[RunResult]:
    """Train every run of ``grid`` at ``budget_name`` into ``out/<run>/`` and write the report into ``out``.

    The runs are those ``runs`` names (names or shell patterns), else those the budget names, else all of them.

    A run whose ``result.json`` exists is not trained again, so a killed study restarts at the first unfinished run;
    its verdict is judged again from its saved ``gradient_health.json`` under the current rules (and saved when it
    changed), so a rerun after the rules changed reports what a new run would;
    a run stopped by SIGTERM or Ctrl+C continues exactly from the checkpoint it wrote (``<run>/interrupted.ckpt``).
    A run killed without one starts over, its partial TensorBoard logs moved aside to ``<run>/abandoned-<n>``;
    a run that fails leaves no folder of its own behind.

    Raises:
        ConfigurationError: Before anything trains, for an unknown budget or a run whose arguments do not work.
    """
    grid, budget = grid.at_budget(budget_name, runs)
    check_runs(grid, budget, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for number, run in enumerate(grid.runs, start=1):
        saved = out / run.name / RESULT_FILE
        if saved.is_file():
            earlier: RunResult = json.loads(saved.read_text())
            result = judged_again(earlier, out / run.name / HEALTH_FILE)
            echo(f"run {number}/{len(grid.runs)} {run.name}: finished earlier, reusing {saved}")
            if result["verdict"] != earlier["verdict"]:
                saved.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False))
                echo(f"  verdict under the current rules: {result['verdict']} (was: {earlier['verdict']})")
        else:
            result = _train_once(
                out / run.name,
                functools.partial(_train, grid, run, budget, out, data_dir, accelerator),
                echo,
            )
            saved.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False))
            (out / run.name / INTERRUPTED).unlink(missing_ok=True)  # the result is the record now
            if result["test_acc"] is not None:
                score = f"test accuracy {result['test_acc']:.1%}"
            elif result.get("test_loss") is not None:
                score = f"test loss {result['test_loss']:.4g}"
            elif result.get("val_loss") is not None:
                score = f"validation loss {result['val_loss']:.4g}"
            else:
                score = "no test or validation score"
            echo(
                f"run {number}/{len(grid.runs)} {run.name}: {score}, {result['wall_time_s']:.0f} s,"
                f" gradients: {result['verdict']}"
            )
        results.append(result)
    write_report(grid, budget_name, budget, results, out, command)
    echo("\n" + table(results, markdown=False))
    echo(f"\nReport: {out / 'report.md'}; gradient-flow plot: {out / 'gradient_flow.png'}")
    echo(f"TensorBoard: tensorboard --logdir {out}")
    return results


def _train_once(run_dir: Path, train: Callable[[Path | None], RunResult], echo: Callable[[str], None]) -> RunResult:
    """Train one run (``train(checkpoint)``): from its interrupted checkpoint when there is one, else from scratch
    with the logs of an abandoned attempt moved aside; a failure other than an interruption removes the folder this
    attempt made."""
    fresh = not run_dir.exists()
    checkpoint = run_dir / INTERRUPTED
    if checkpoint.is_file():
        echo(f"run {run_dir.name}: continuing from {checkpoint}")
    elif stale := [*run_dir.glob("events.out.tfevents.*"), *run_dir.glob("hparams.yaml")]:
        aside = run_dir / f"abandoned-{1 + sum(1 for _ in run_dir.glob('abandoned-*'))}"
        aside.mkdir()
        for path in stale:
            path.rename(aside / path.name)
    try:
        return train(checkpoint if checkpoint.is_file() else None)
    except BaseException:
        if fresh and not checkpoint.is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train(
    grid: Grid,
    run: RunSpec,
    budget: Budget,
    out: Path,
    data_dir: str | None,
    accelerator: str,
    checkpoint: Path | None = None,
) -> RunResult:
    seed_everything(grid.seed, verbose=False)
    model = run.model_class(**run.model_args)
    datamodule = run.data_class(**data_arguments(run, budget, data_dir))
    health = GradientHealthCallback(log_every_n_steps=budget.log_every_n_steps, verbose=False)
    recorder = StudyRecorder()
    trainer_args: dict[str, Any] = {
        "max_epochs": budget.max_epochs,
        "accelerator": accelerator,
        "devices": 1,
        "log_every_n_steps": budget.log_every_n_steps,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **run.trainer_args,
    }
    run_dir = out / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_config(run, budget, trainer_args, model, datamodule, run_dir / "config.yaml")
    extra = [callback_class(**arguments) for callback_class, arguments in run.callbacks]
    trainer = Trainer(
        # The event files in the run's own folder, so that TensorBoard (--logdir <out>) names the run by its name alone;
        # no hp_metric: Lightning's placeholder scalar (-1) would sit empty beside the study's real metrics.
        logger=TensorBoardLogger(out, name=run.name, version="", default_hp_metric=False),
        callbacks=[
            health,
            *extra,
            recorder,
            InterruptCheckpoint(
                str(run_dir),
                INTERRUPTED.removesuffix(".ckpt"),
                resume_hint="Rerun the same `stabilize study` command: it continues this run from there.",
            ),
            *([_progress(run.name)] if trainer_args.get("enable_progress_bar", True) else []),
        ],
        default_root_dir=run_dir,
        **trainer_args,
    )
    trainer.fit(model, datamodule, ckpt_path=checkpoint)
    train_acc = trainer.callback_metrics.get("train/acc_epoch")
    testable = is_overridden("test_step", model, LightningModule) and is_overridden(
        "test_dataloader", datamodule, LightningDataModule
    )
    tested = trainer.test(model, datamodule, verbose=False) if testable else []
    test_acc = tested[0].get("test/acc") if tested else None
    test_loss = tested[0].get("test/loss") if tested else None
    health.save_json(run_dir / HEALTH_FILE)
    model_name = f"{type(model).__module__}.{type(model).__qualname__}"
    train_accuracy = float(train_acc) if train_acc is not None else None
    # The other monitors' own findings (ForwardStatisticsMonitor, SharpnessMonitor), by class.
    diagnoses = {}
    for callback in extra:
        diagnose = getattr(callback, "diagnosis", None)
        if callable(diagnose):
            diagnoses[type(callback).__name__] = str(diagnose())
    return collect(
        run.name,
        model_name,
        recorder,
        health,
        train_accuracy,
        test_acc,
        trainer.global_step,
        test_loss=test_loss,
        model_args=run.model_args,
        diagnoses=diagnoses,
    )


def _progress(name: str) -> Callback:
    """Lightning's bar on a terminal; plain lines into a log file (no redraws)."""
    return _RunProgressBar(name) if sys.stderr.isatty() else LineProgress(prefix=name)


class _RunProgressBar(TQDMProgressBar):
    """Lightning's bar, labelled with the run's name instead of the logger's version."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.run_name = name

    @override
    def get_metrics(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {"run": self.run_name, **metrics}


def _save_config(run: RunSpec, budget: Budget, trainer_args: dict[str, Any], model: Any, data: Any, path: Path) -> None:
    """The run as resolved: every argument of the model and the data (defaults included), the Trainer's, the budget."""
    config = {
        "model": {
            "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
            "init_args": dict(model.hparams),
        },
        "data": {"class_path": f"{type(data).__module__}.{type(data).__qualname__}", "init_args": dict(data.hparams)},
        "trainer": trainer_args,
        "callbacks": [
            {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": arguments}
            for cls, arguments in [
                (GradientHealthCallback, {"log_every_n_steps": budget.log_every_n_steps}),
                *run.callbacks,
            ]
        ],
        "budget": {
            key: value for key, value in budget.__dict__.items() if key not in ("runs", "model", "data", "trainer")
        },
    }
    path.write_text(yaml.safe_dump(jsonable(config), sort_keys=False))
