"""A study grid: the runs of one experiment and the budgets it can run at, read from YAML and checked up front."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule

import stabilize.callbacks
import stabilize.datamodules
import stabilize.models
from stabilize.errors import ConfigurationError
from stabilize.shipped import require_config


@dataclass(frozen=True)
class Budget:
    """How much data and time each run of a study gets.

    Args:
        max_epochs: Epochs per run.
        train_subset: Training images (a seeded, class-balanced subset), or ``None`` for all of them.
        val_size: Training images held out for validation.
        batch_size: Images per batch, or ``None`` for the datamodule's default.
        log_every_n_steps: Logging interval, also GradientHealthCallback's detail interval.
        runs: Names or shell patterns (``adding100-*``) of the grid's runs this budget trains, or ``None`` for all:
            a longer budget spends its time on the runs whose claim the shorter one left open.
        model: Model arguments of every run at this budget (``channels_last: true`` on a GPU); a run's own win.
        data: Datamodule arguments of every run at this budget (``device: cuda``); a run's own win.
        trainer: Trainer arguments of every run at this budget (``precision: bf16-mixed``); a run's own win.
    """

    max_epochs: int
    train_subset: int | None
    val_size: int
    batch_size: int | None = None
    log_every_n_steps: int = 10
    runs: tuple[str, ...] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


#: ``cpu-small``: a look at the article's claims on a 2-core CPU in minutes per run; ``full``: He et al.'s schedule
#: length on all the data, for a GPU. A grid may override any field per budget.
BUDGETS = {
    "cpu-small": Budget(max_epochs=3, train_subset=10_000, val_size=2_000, log_every_n_steps=10),
    "full": Budget(max_epochs=160, train_subset=None, val_size=5_000, log_every_n_steps=50),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: a model class and its arguments, data arguments and Trainer overrides."""

    name: str
    model_class: type[LightningModule]
    model_args: dict[str, Any]
    data_class: type[LightningDataModule]
    data_args: dict[str, Any]
    trainer_args: dict[str, Any] = field(default_factory=dict)
    #: Extra callbacks of this run, as (class, arguments); GradientHealthCallback is always there.
    callbacks: list[tuple[type[Callback], dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    runs: list[RunSpec]
    budgets: dict[str, Budget]
    seed: int = 42

    def budget(self, name: str) -> Budget:
        if name not in self.budgets:
            raise ConfigurationError(f"Unknown budget {name!r}; grid {self.name!r} offers {sorted(self.budgets)}.")
        return self.budgets[name]

    def at_budget(self, name: str, runs: Sequence[str] | None = None) -> tuple[Grid, Budget]:
        """The runs budget ``name`` trains (those ``runs`` names or patterns, else the budget's own, else all), each
        with the budget's model, data and Trainer settings under its own; and the budget."""
        budget = self.budget(name)
        chosen = self.select(runs if runs is not None else budget.runs).runs
        return replace(
            self,
            runs=[
                replace(
                    run,
                    model_args={**budget.model, **run.model_args},
                    data_args={**budget.data, **run.data_args},
                    trainer_args={**budget.trainer, **run.trainer_args},
                )
                for run in chosen
            ],
        ), budget

    def smoke(self, budget_name: str) -> Grid:
        """This grid cut to a dry run at ``budget_name``: every run for 3 training batches and one validation and test
        batch, on all the training data the datamodule has (so a tiny copy works), to check that a grid meant for
        another machine (``gpu-short``) builds, trains and reports before spending that machine's time on it."""
        budget = self.budget(budget_name)
        dry = replace(budget, max_epochs=1, train_subset=None, val_size=min(budget.val_size, 64), log_every_n_steps=1)
        limits = {"limit_train_batches": 3, "limit_val_batches": 1, "limit_test_batches": 1, "log_every_n_steps": 1}
        runs = [replace(run, trainer_args={**run.trainer_args, **limits}) for run in self.runs]
        return replace(self, runs=runs, budgets={**self.budgets, budget_name: dry})

    def select(self, patterns: Sequence[str] | None) -> Grid:
        """This grid with only the runs a name or shell pattern of ``patterns`` matches, in the grid's order
        (``None``: all of them).

        Raises:
            ConfigurationError: For a pattern that matches no run, with the nearest run names.
        """
        if patterns is None:
            return self
        names = [run.name for run in self.runs]
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                near = difflib.get_close_matches(pattern, names, n=3) or names[:5]
                raise ConfigurationError(
                    f"grid {self.name!r} has no run matching {pattern!r}; did you mean {', '.join(near)}?"
                )
        kept = [run for run in self.runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]
        return replace(self, runs=kept)


def load_grid(path: str | Path) -> Grid:
    """Read a grid YAML, a file or a shipped grid's name (``quickstart``: see `stabilize.shipped`); every entry
    is resolved and checked before anything trains.

    Raises:
        ConfigurationError: Naming the entry, for an unknown class, a bad argument or a malformed file.
    """
    path = require_config(str(path), "study")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("runs"), list) or not raw["runs"]:
        raise ConfigurationError(f"{path}: a grid needs a non-empty 'runs' list.")
    defaults = raw.get("defaults", {}) or {}
    runs, names = [], set()
    for position, entry in enumerate(raw["runs"]):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ConfigurationError(f"{path}: run {position + 1} needs a 'name'.")
        name = str(entry["name"])
        if name in names or "/" in name:
            raise ConfigurationError(f"{path}: run names must be unique and contain no '/': {name!r}.")
        names.add(name)
        merged = _merge(defaults, entry)
        try:
            runs.append(_run_spec(name, merged))
        except ConfigurationError as error:
            raise ConfigurationError(f"{path}: run {name!r}: {error}") from error
    budgets = dict(BUDGETS)
    for budget_name, overrides in (raw.get("budgets") or {}).items():
        base = budgets.get(budget_name, BUDGETS["cpu-small"])
        known = {f.name for f in fields(Budget)}
        if not isinstance(overrides, dict) or not set(overrides) <= known:
            raise ConfigurationError(f"{path}: budget {budget_name!r} may set only {sorted(known)}.")
        if "runs" in overrides:
            overrides = {**overrides, "runs": _patterns(overrides["runs"], f"{path}: budget {budget_name!r}: runs")}
        for part in ("model", "data", "trainer"):
            if not isinstance(overrides.get(part, {}), dict):
                raise ConfigurationError(f"{path}: budget {budget_name!r}: {part} must be a mapping of arguments.")
        budgets[budget_name] = replace(base, **overrides)
    grid = Grid(raw.get("name", path.stem), raw.get("description", ""), runs, budgets, int(raw.get("seed", 42)))
    for budget_name, budget in budgets.items():
        try:
            grid.select(budget.runs)
        except ConfigurationError as error:
            raise ConfigurationError(f"{path}: budget {budget_name!r}: {error}") from error
    return grid


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{where} must be a non-empty list of run names or patterns.")
    return tuple(value)


def check_runs(grid: Grid, budget: Budget, data_dir: str | None) -> None:
    """Instantiate every run's model and datamodule once (cheap), so a bad argument fails before any training."""
    for run in grid.runs:
        try:
            run.model_class(**run.model_args)
            run.data_class(**data_arguments(run, budget, data_dir))
            for callback_class, arguments in run.callbacks:
                callback_class(**arguments)
        except (ConfigurationError, TypeError, ValueError) as error:
            raise ConfigurationError(f"grid {grid.name!r}, run {run.name!r}: {error}") from error


def data_arguments(run: RunSpec, budget: Budget, data_dir: str | None) -> dict[str, Any]:
    """The datamodule arguments of ``run`` under ``budget`` (the run's own settings win over the budget's); budget
    fields the datamodule does not take (a synthetic task has no ``data_dir`` or ``train_subset``) are left out."""
    args: dict[str, Any] = {"train_subset": budget.train_subset, "val_size": budget.val_size}
    if budget.batch_size is not None:
        args["batch_size"] = budget.batch_size
    if data_dir is not None:
        args["data_dir"] = data_dir
    accepted = _init_arguments(run.data_class)
    return {**{k: v for k, v in args.items() if k in accepted}, **run.data_args}


def _init_arguments(cls: type) -> set[str]:
    """Names the ``__init__`` chain of ``cls`` accepts (subclasses pass ``**kwargs`` on to their bases)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")}
    return names


def _run_spec(name: str, entry: dict[str, Any]) -> RunSpec:
    model = entry.get("model") or {}
    data = entry.get("data") or {}
    trainer = entry.get("trainer") or {}
    if not isinstance(model, dict) or "class_path" not in model:
        raise ConfigurationError("needs model.class_path (e.g. ResNet or my_package.MyModel).")
    model_class = _resolve(model["class_path"], stabilize.models, LightningModule)
    data_class = _resolve(data.get("class_path", "CIFAR10DataModule"), stabilize.datamodules, LightningDataModule)
    if not isinstance(trainer, dict):
        raise ConfigurationError("trainer must be a mapping of Trainer arguments.")
    callbacks = [
        (_resolve(c.get("class_path", ""), stabilize.callbacks, Callback), dict(c.get("init_args") or {}))
        for c in entry.get("callbacks") or []
    ]
    return RunSpec(
        name,
        model_class,
        dict(model.get("init_args") or {}),
        data_class,
        dict(data.get("init_args") or {}),
        dict(trainer),
        callbacks,
    )


def _resolve(class_path: str, package: Any, base: type) -> Any:
    """A class by short name (from ``package``) or import path, checked to subclass ``base``."""
    if "." not in class_path:
        found = getattr(package, class_path, None)
    else:
        module_name, _, class_name = class_path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            found = None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ConfigurationError(
            f"unknown class {class_path!r}: not a {base.__name__} in {package.__name__} or an import path."
        )
    return found


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``override`` replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
