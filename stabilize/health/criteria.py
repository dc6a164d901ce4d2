"""HealthCriteria: when a layer's gradient is vanishing, a step's is exploding, and a run's has collapsed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stabilize.errors import ConfigurationError

#: The largest running-median window accepted (a window is one float per step on the device).
MAX_MEDIAN_WINDOW = 100_000


@dataclass(frozen=True)
class HealthCriteria:
    """When a layer is vanishing and a step exploding; the defaults and why:

    - a layer is *vanishing* when its gradient L2 norm is below ``vanishing_threshold`` (1e-8: an update of
      ``lr * 1e-8`` is below fp32's resolution of weights of norm ~1, so the layer is frozen) or below
      ``vanishing_ratio`` (1e-5) times the largest layer norm of the step (that layer learns 100,000x slower than
      the fastest one; healthy ResNets and BatchNorm nets stay within ~1e-3, a plain deep sigmoid net falls to
      1e-10 and below);
    - a step is *exploding* when the total norm exceeds ``exploding_threshold`` (1e3: cross-entropy gradients of
      a healthy classifier are O(0.1-10)) or exceeds ``exploding_factor`` (10x) times the running median of the
      last ``median_window`` (64) finite step norms;
    - a run's gradient has *collapsed* when the median total norm of its latest records is ``collapse_factor``
      (100x) below the largest such median earlier in the run (unless an explosion reached that level: norms
      falling back after one are no collapse), although no layer need be below the vanishing floor: every layer
      got quieter together, as when a loss saturates (a GAN discriminator that wins outright took the generator's
      gradient 736x down in 2,500 steps; the classifiers of this project's studies fell at most 5.1x, see
      :func:`~stabilize.health.collapse.gradient_collapse`).

    Raises:
        ValueError: If a value has the wrong type, lies out of range, or the thresholds are inverted.
    """

    vanishing_threshold: float = 1e-8
    vanishing_ratio: float = 1e-5
    exploding_threshold: float = 1e3
    exploding_factor: float = 10.0
    median_window: int = 64
    collapse_factor: float = 100.0

    def __post_init__(self) -> None:
        for name in ("vanishing_threshold", "exploding_threshold", "exploding_factor"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}.")
        if not (_is_number(self.vanishing_ratio) and 0 < self.vanishing_ratio < 1):
            raise ConfigurationError(f"vanishing_ratio must be in (0, 1), got {self.vanishing_ratio!r}.")
        if self.vanishing_threshold >= self.exploding_threshold:
            raise ConfigurationError(
                f"vanishing_threshold ({self.vanishing_threshold}) must be below exploding_threshold"
                f" ({self.exploding_threshold})."
            )
        if self.exploding_factor <= 1:
            raise ConfigurationError(
                f"exploding_factor must be above 1 (a jump over the median), got {self.exploding_factor}."
            )
        if not (_is_number(self.collapse_factor) and self.collapse_factor > 1):
            raise ConfigurationError(f"collapse_factor must be above 1, got {self.collapse_factor!r}.")
        if not (_is_int(self.median_window) and 3 <= self.median_window <= MAX_MEDIAN_WINDOW):
            raise ConfigurationError(
                f"median_window must be an integer from 3 to {MAX_MEDIAN_WINDOW}, got {self.median_window!r}."
            )

    def vanishing_floor(self, largest: float) -> float:
        """The norm below which a layer is vanishing, given the largest layer norm of the step."""
        return max(self.vanishing_threshold, self.vanishing_ratio * largest)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
