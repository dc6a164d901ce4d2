"""The experiment configs and study grids that ship inside the package, found by name from any folder.

``stabilize fit --config resnet20`` and ``stabilize study quickstart`` use them; ``stabilize configs`` lists them and
``stabilize configs resnet20`` prints one (to copy and edit). In a checkout, ``configs/`` is the same folder.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from stabilize.errors import ConfigurationError


def configs_folder() -> Path:
    """The folder of the shipped experiment configs (``study/`` inside it holds the grids)."""
    return Path(str(resources.files("stabilize") / "configs"))


def shipped_names(kind: str = "fit") -> list[str]:
    """The names of the shipped experiment configs (``kind="fit"``) or study grids (``kind="study"``), sorted."""
    folder = configs_folder() / "study" if kind == "study" else configs_folder()
    return sorted(path.stem for path in folder.glob("*.yaml"))


def resolve_config(value: str, kind: str = "fit") -> Path | None:
    """``value`` as a file when it is one, else the shipped config or grid of that name (``resnet20``,
    ``resnet20.yaml``, ``configs/resnet20.yaml``); ``None`` when it is neither."""
    path = Path(value)
    if path.is_file():
        return path
    folder = configs_folder() / "study" if kind == "study" else configs_folder()
    candidate = folder / f"{path.stem}.yaml"
    return candidate if candidate.is_file() else None


def unknown_config_message(value: str, kind: str = "fit") -> str:
    """One line for a config or grid that is neither a file nor a shipped name: the names, the nearest first."""
    names = shipped_names(kind)
    what = "study grid" if kind == "study" else "config"
    near = difflib.get_close_matches(Path(value).stem, names, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"No {what} {value!r}: not a file, nor a shipped {what} ({', '.join(names)}).{hint}"


def require_config(value: str, kind: str = "fit") -> Path:
    """Like `resolve_config`, but a value that is neither raises.

    Raises:
        ConfigurationError: Listing the shipped names and suggesting the nearest.
    """
    path = resolve_config(value, kind)
    if path is None:
        raise ConfigurationError(unknown_config_message(value, kind))
    return path
