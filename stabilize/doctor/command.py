"""``stabilize doctor``: the doctor on a run of the ``stabilize fit`` command, from its config and flags.

    stabilize doctor --config configs/exploding_relu.yaml --data.data_dir ../shared/cifar10
    stabilize fit --config configs/exploding_relu.yaml --config stabilize-doctor/fix.yaml ...

Every argument the ``fit`` subcommand takes describes the run; ``--doctor.*`` options set the doctor's own:
``steps`` (probe budget, default 200), ``max_trials`` (8), ``try_all``, ``baseline_loss``, ``monitor`` and ``mode``
(judge the trials by a metric the model logs, e.g. ``--doctor.monitor val/acc --doctor.mode max``; default: the
training loss) and ``out`` (the folder of ``report.md``, ``loss.png`` and, when a remedy works, ``fix.yaml``:
default ``stabilize-doctor``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
    Timer,
)

from stabilize.callbacks import (
    ForwardStatisticsMonitor,
    GradientHealthCallback,
    InterruptCheckpoint,
    LineProgress,
    SampleQuality,
    SharpnessMonitor,
)
from stabilize.doctor.remedies import Remedy
from stabilize.doctor.repair import DoctorResult, doctor

#: Callbacks of the user's run that only watch, save or print: a trial leaves them out.
BOOKKEEPING = (
    ModelCheckpoint,
    LearningRateMonitor,
    ProgressBar,
    ModelSummary,
    EarlyStopping,
    Timer,
    InterruptCheckpoint,
    LineProgress,
    SampleQuality,
    SharpnessMonitor,
    ForwardStatisticsMonitor,
)
#: Trainer settings of the user's run that a trial keeps (they change what a step computes).
KEPT_TRAINER_SETTINGS = (
    "accelerator",
    "devices",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
)


def doctor_options(arguments: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The ``--doctor.*`` options, and the rest (the run's ``fit`` arguments)."""
    parser = argparse.ArgumentParser(prog="stabilize doctor", allow_abbrev=False, add_help=False)
    parser.add_argument("--doctor.steps", dest="steps", type=int, default=200)
    parser.add_argument("--doctor.max_trials", dest="max_trials", type=int, default=8)
    parser.add_argument("--doctor.try_all", dest="try_all", action="store_true")
    parser.add_argument("--doctor.baseline_loss", dest="baseline_loss", type=float, default=None)
    parser.add_argument("--doctor.seed", dest="seed", type=int, default=None)
    parser.add_argument("--doctor.monitor", dest="monitor", default=None)
    parser.add_argument("--doctor.mode", dest="mode", choices=("min", "max"), default="min")
    parser.add_argument("--doctor.out", dest="out", type=Path, default=Path("stabilize-doctor"))
    return parser.parse_known_args(list(arguments))


def doctor_main(arguments: Sequence[str]) -> DoctorResult:
    """Run the doctor on the run ``arguments`` describe (``stabilize fit``'s, plus ``--doctor.*``); print its
    report and write it, the loss plot and (when a remedy works) the config patch to ``--doctor.out``."""
    from stabilize.cli import StabilizeCLI
    from stabilize.cli_arguments import resolve_arguments

    options, rest = doctor_options(arguments)
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__)
        sys.exit(0)
    rest = resolve_arguments(["fit", *rest])[1:]
    argv, sys.argv = sys.argv, sys.argv[:1]  # the run's arguments are passed as args: Lightning warns about both
    try:
        cli = StabilizeCLI(args=rest, run=False)
    finally:
        sys.argv = argv
    seed = options.seed if options.seed is not None else int(cli.config.get("seed_everything") or 0)
    settings = cli.config.get("trainer", {})
    trainer_kwargs = {key: settings[key] for key in KEPT_TRAINER_SETTINGS if settings.get(key) is not None}

    def model() -> LightningModule:
        return cli.parser.instantiate_classes(cli.config)["model"]

    def data() -> LightningDataModule | None:
        # A new datamodule per trial: one that keeps a generator (augmentation draws) must start each trial afresh.
        return cli.parser.instantiate_classes(cli.config).get("data")

    def callbacks() -> list[Callback]:
        fresh = cli.parser.instantiate_classes(cli.config)["trainer"].get("callbacks") or []
        kept = [c for c in (fresh if isinstance(fresh, list) else [fresh]) if not isinstance(c, BOOKKEEPING)]
        for callback in kept:
            if isinstance(callback, GradientHealthCallback):
                callback.verbose = False  # the doctor's table says it, once per trial
        return kept

    print(f"stabilize doctor: probing {type(cli.model).__name__} for {options.steps} steps (seed {seed})")
    result = doctor(
        model,
        data,
        steps=options.steps,
        seed=seed,
        trainer_kwargs=trainer_kwargs,
        callbacks=callbacks,
        max_trials=options.max_trials,
        try_all=options.try_all,
        baseline_loss=options.baseline_loss,
        log=lambda line: print(f"  {line}", flush=True),
        monitor=options.monitor,
        mode=options.mode,
    )
    report = result.report()
    options.out.mkdir(parents=True, exist_ok=True)
    best = result.best
    if best is not None and best.remedy is not None:
        patch = config_patch(best.remedy, yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)), cli.model)
        fix = options.out / "fix.yaml"
        fix.write_text(f"# stabilize doctor: {best.remedy.name}\n" + yaml.safe_dump(patch, sort_keys=False))
        report += f"\nConfig patch: {fix} (stabilize fit {' '.join(rest)} --config {fix})"
    print()
    print(report)
    (options.out / "report.md").write_text(report + "\n")
    result.plot().savefig(options.out / "loss.png", dpi=110)
    return result


def config_patch(remedy: Remedy, config: dict[str, Any], model: LightningModule) -> dict[str, Any]:
    """The YAML config that applies ``remedy`` on top of ``config`` (the run's whole config, as a dict): a second
    ``--config`` replaces lists, so the patch lists the run's callbacks with the remedy's after them."""
    patch: dict[str, Any] = {}
    trainer: dict[str, Any] = dict(remedy.trainer)
    if remedy.callbacks:
        listed = (config.get("trainer") or {}).get("callbacks") or []
        listed = [_without_defaults(entry) for entry in (listed if isinstance(listed, list) else [listed])]
        added = [
            {"class_path": f"stabilize.callbacks.{cls.__name__}", "init_args": dict(arguments)}
            for cls, arguments in remedy.callbacks
        ]
        trainer["callbacks"] = [*listed, *added]
    if trainer:
        patch["trainer"] = trainer
    if remedy.variant is not None:
        variant = remedy.variant
        if variant.model_class is None:
            patch["model"] = {"init_args": dict(variant.init_args)}
        else:
            kept = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in variant.drop}
            cls = variant.model_class
            path = f"stabilize.models.{cls.__name__}" if cls.__module__.startswith("stabilize.") else cls.__qualname__
            patch["model"] = {"class_path": path, "init_args": _plain({**kept, **variant.init_args})}
    return patch


def _without_defaults(entry: Any) -> Any:
    """A ``class_path``/``init_args`` entry without the arguments that equal its class's defaults (the config dump
    writes them all)."""
    if not isinstance(entry, dict) or "class_path" not in entry:
        return entry
    module, _, name = entry["class_path"].rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return entry
    given = {
        key: value
        for key, value in (entry.get("init_args") or {}).items()
        if key not in parameters or _plain({key: parameters[key].default})[key] != value
    }
    return {"class_path": entry["class_path"], **({"init_args": given} if given else {})}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """YAML-safe values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
