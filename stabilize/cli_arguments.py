"""What the ``stabilize`` command does with its arguments before Lightning's CLI sees them: shipped configs by name,
and unknown class names told apart with a suggestion (the overview, ``--version`` and ``configs`` are
`stabilize.launcher`'s, which answers them without importing torch).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

from lightning.pytorch import Callback, LightningDataModule, LightningModule

from stabilize.errors import ConfigurationError
from stabilize.shipped import require_config

#: Lightning's subcommands, which take ``--config``.
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The flags that name a class, and the base class its short names are subclasses of.
CLASS_FLAGS: dict[str, type] = {
    "--model": LightningModule,
    "--data": LightningDataModule,
    "--trainer.callbacks": Callback,
    "--trainer.callbacks+": Callback,
}


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
