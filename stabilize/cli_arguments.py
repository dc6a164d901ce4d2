"""What the ``stabilize`` command does with its arguments before Lightning's CLI sees them: the overview help,
``--version``, ``stabilize configs``, shipped configs by name, and unknown class names told apart with a suggestion.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence

from lightning.pytorch import Callback, LightningDataModule, LightningModule

import stabilize
from stabilize.errors import ConfigurationError
from stabilize.shipped import configs_folder, require_config, shipped_names

#: Lightning's subcommands, which take ``--config``.
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The flags that name a class, and the base class its short names are subclasses of.
CLASS_FLAGS: dict[str, type] = {
    "--model": LightningModule,
    "--data": LightningDataModule,
    "--trainer.callbacks": Callback,
    "--trainer.callbacks+": Callback,
}


def overview() -> str:
    """``stabilize --help``: every subcommand in one line, then where to read more."""
    version = stabilize.__version__
    return f"""usage: stabilize {{fit,validate,test,predict,study,doctor,configs}} ... (stabilize {version})

See, and stop, vanishing and exploding gradients: Lightning models, datamodules and GradientHealthCallback.

subcommands:
  fit        train a model: stabilize fit --config resnet20 [--data.data_dir DIR] (Lightning's CLI)
  validate   evaluate a checkpoint on the validation split (--ckpt_path FILE)
  test       evaluate a checkpoint on the test split (--ckpt_path FILE)
  predict    run a checkpoint's predictions
  study      train a grid of runs and write a report: stabilize study quickstart --data-dir DIR
  doctor     try the remedies on a failing run, say which works: stabilize doctor --config exploding_relu
  configs    list the shipped configs and grids, or print one: stabilize configs resnet20

options:
  -h, --help     this overview; `stabilize fit --help` lists every flag of a subcommand
  --version      the installed version

Models: {", ".join(_short_names(LightningModule, "stabilize.models"))}
Data:   {", ".join(_short_names(LightningDataModule, "stabilize.datamodules"))}"""


def configs_command(arguments: Sequence[str]) -> str:
    """``stabilize configs``: the shipped configs and grids with their first comment line; ``stabilize configs NAME``:
    the file itself (``> my.yaml`` to copy it)."""
    if arguments and not arguments[0].startswith("-"):
        name = arguments[0]
        kind = "study" if name in shipped_names("study") and name not in shipped_names() else "fit"
        return require_config(name, kind).read_text()
    lines = ["Experiment configs (stabilize fit --config NAME):"]
    lines += [f"  {name:<22} {_summary(name, 'fit')}" for name in shipped_names()]
    lines += ["", "Study grids (stabilize study NAME):"]
    lines += [f"  {name:<22} {_summary(name, 'study')}" for name in shipped_names("study")]
    lines += ["", f"Folder: {configs_folder()}; `stabilize configs NAME > my.yaml` copies one to edit."]
    return "\n".join(lines)


def resolve_arguments(arguments: list[str]) -> list[str]:
    """Replace a shipped config's name after ``--config`` by its path, and refuse an unknown class name (``--model
    ResNt``) with the known ones and the nearest, before Lightning's CLI prints its usage.

    Raises:
        ConfigurationError: For a ``--config`` that is neither a file nor a shipped name, or an unknown class name.
    """
    if not arguments or arguments[0] not in TRAINER_SUBCOMMANDS:
        return arguments
    resolved = list(arguments)
    for position, flag, value in _flag_values(resolved):
        if flag == "--config":
            path = str(require_config(value))
            resolved[position] = f"--config={path}" if resolved[position].startswith("--config=") else path
        elif flag in CLASS_FLAGS:
            _check_class_name(flag, value)
    return resolved


def _flag_values(arguments: list[str]) -> Iterator[tuple[int, str, str]]:
    """``(position of the value, flag, value)`` for ``--flag value`` and ``--flag=value``."""
    for position, argument in enumerate(arguments):
        if not argument.startswith("--"):
            continue
        if "=" in argument:
            flag, value = argument.split("=", 1)
            yield position, flag, value
        elif position + 1 < len(arguments) and not arguments[position + 1].startswith("--"):
            yield position + 1, argument, arguments[position + 1]


def _check_class_name(flag: str, value: str) -> None:
    # Import paths, YAML files and inline dicts are Lightning's to resolve; a short name is checked here.
    if not value.isidentifier():
        return
    base = CLASS_FLAGS[flag]
    known = {cls.__name__ for cls in _subclasses(base)}
    if value in known:
        return
    listed = _short_names(base, "stabilize") or sorted(known)
    near = difflib.get_close_matches(value, sorted(known), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ConfigurationError(
        f"{flag.rstrip('+')} {value!r}: no such {base.__name__}.{hint} This library's: {', '.join(listed)}; any"
        " other by its import path (my_package.MyClass)."
    )


def _subclasses(base: type) -> set[type]:
    found: set[type] = set()
    pending = [base]
    while pending:
        children: list[type] = pending.pop().__subclasses__()
        for child in children:
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _short_names(base: type, package: str) -> list[str]:
    """Public subclasses of ``base`` defined in ``package``, by name, without the bases to build on (a class that
    sets ``abstract_base = True`` itself)."""
    return sorted(
        {
            cls.__name__
            for cls in _subclasses(base)
            if cls.__module__.startswith(package)
            and not cls.__name__.startswith("_")
            and not cls.__dict__.get("abstract_base", False)
        }
    )


def _summary(name: str, kind: str) -> str:
    """The first comment line of a shipped config, cut to fit a line."""
    for line in require_config(name, kind).read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text if len(text) <= 90 else text[:87] + "..."
    return ""
