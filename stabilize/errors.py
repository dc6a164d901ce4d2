"""The errors stabilize raises on purpose: a wrong setting or broken data, reported by the ``stabilize`` command as
one message naming the argument or file and the fix, without a traceback (``STABILIZE_DEBUG=1`` shows it)."""

from __future__ import annotations

import operator
import os
from pathlib import Path


class StabilizeError(Exception):
    """Base of the errors that describe the user's setup, not a bug."""


class ConfigurationError(StabilizeError, ValueError):
    """An argument has a value that cannot work (out of range, unknown name, inconsistent with another)."""


class DataError(StabilizeError, ValueError):
    """The data is broken or does not fit the model: a corrupt file, bad labels, NaN pixels, a shape mismatch."""


class DataTypeError(StabilizeError, TypeError):
    """The data has the wrong type for the model (e.g. integer images, float64 into a float32 model)."""


class DataNotFoundError(StabilizeError, FileNotFoundError):
    """The data is not where the settings say.

    Args:
        message: What was searched and how to fix it.
        searched: What was searched, without the fix (a command with other flags words its own fix around it).
    """

    def __init__(self, message: str, searched: str | None = None) -> None:
        super().__init__(message)
        self.searched = searched or message


class TrainingDivergedError(StabilizeError, FloatingPointError):
    """Training ended with non-finite weights: the run diverged and its result must not be used."""


def check_writable_folder(folder: Path, argument: str) -> None:
    """Raise `ConfigurationError` naming ``argument`` when ``folder`` can neither be created nor written.

    Raises:
        ConfigurationError: ``folder`` is a file, or it (or the first existing folder above it) is not writable.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigurationError(f"{argument} {folder}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{argument} {folder}: {existing} is not writable; choose another folder.")


def check_integers(minimum: int | None = None, **values: object) -> None:
    """Raise `ConfigurationError` naming the first of ``values`` that is not an integer (a bool or a float such
    as 1.5 is not; ``None`` is skipped, for optional arguments) or is below ``minimum``.

    Raises:
        ConfigurationError: ``"n_critic must be an integer, got 1.5."`` or ``"... must be at least 1, got 0."``
    """
    for name, value in values.items():
        if value is None:
            continue
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            number = None
        if number is None or isinstance(value, bool):
            raise ConfigurationError(f"{name} must be an integer, got {value!r}.")
        if minimum is not None and number < minimum:
            raise ConfigurationError(f"{name} must be at least {minimum}, got {number}.")
