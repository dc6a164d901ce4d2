"""The errors stabilize raises on purpose: a wrong setting or broken data, reported by the ``stabilize`` command as
one message naming the argument or file and the fix, without a traceback (``STABILIZE_DEBUG=1`` shows it)."""

from __future__ import annotations


class StabilizeError(Exception):
    """Base of the errors that describe the user's setup, not a bug."""


class ConfigurationError(StabilizeError, ValueError):
    """An argument has a value that cannot work (out of range, unknown name, inconsistent with another)."""


class DataError(StabilizeError, ValueError):
    """The data is broken or does not fit the model: a corrupt file, bad labels, NaN pixels, a shape mismatch."""


class DataTypeError(StabilizeError, TypeError):
    """The data has the wrong type for the model (e.g. integer images, float64 into a float32 model)."""


class DataNotFoundError(StabilizeError, FileNotFoundError):
    """The data is not where the settings say."""


class TrainingDivergedError(StabilizeError, FloatingPointError):
    """Training ended with non-finite weights: the run diverged and its result must not be used."""
