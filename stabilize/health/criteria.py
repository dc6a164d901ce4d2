"""HealthCriteria: when a layer's gradient is vanishing, a run's is exploding, and a run's has collapsed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stabilize.errors import ConfigurationError

#: The largest running-median window accepted (a window is one float per step on the device).
MAX_MEDIAN_WINDOW = 100_000
#: Consecutive steps above a ceiling that make an explosion (one step can be a batch whose loss is near zero).
CEILING_PERSISTENCE = 5
#: The loss-relative ceiling judges only steps whose loss is at least this fraction of the first step's: a converged
#: regression's loss falls toward zero faster than its gradient (MSE: gradient ~ sqrt(loss), so gradient / loss grows
#: without bound), which is no explosion. Small enough to keep judging a run whose first loss was itself blown up
#: (the adding-problem IRNN starts at 438 and sits at 0.17 with a gradient 1e4x its loss).
CEILING_LOSS_FLOOR = 1e-4
#: A ReLU-like module with at least this fraction of dead channels (no positive output in the batch) is a finding.
DEAD_UNITS_FRACTION = 0.5


@dataclass(frozen=True)
class HealthCriteria:
    """When a layer is vanishing, a run exploding and a run's gradient collapsed; the defaults and why:

    - a layer is *vanishing* when its gradient L2 norm is below ``vanishing_threshold`` (1e-8: an update of
      ``lr * 1e-8`` is below fp32's resolution of weights of norm ~1, so the layer is frozen) or below
      ``vanishing_ratio`` (1e-5) times the largest layer norm of the step (that layer learns 100,000x slower than
      the fastest one; healthy ResNets and BatchNorm nets stay within ~1e-3, a plain deep sigmoid net falls to
      1e-10 and below); when the training loss fell by most of its range, the absolute floor applies only while
      some layer is above it (a converged regression has every gradient near zero; a generator facing a
      discriminator that wins from the start has every gradient near zero too, and its loss did not fall);
    - a step is a *spike* when its total norm exceeds ``exploding_factor`` (10x) times the running median of the
      last ``median_window`` (64) finite step norms, judged only once the window holds ``warmup_steps`` (16) norms
      (or is full, if smaller): a median of one or two early norms says nothing about the run's range. The rule
      is scale-free: multiplying the loss by any constant changes no spike;
    - spikes are an *explosion* only with evidence that the gradient is out of control (see
      `classify_spikes`): ``spike_persistence`` (32) consecutive spikes (a single
      hard batch makes one, a healthy run knocked off course a run of a few; a diverging run's norm outgrows its
      median step after step), the training loss not coming back after the spike, non-finite gradients following
      the spike, or the total norm out of range for `CEILING_PERSISTENCE` (5) steps in a row. Out of range
      means above ``gradient_to_loss_ceiling`` (1e3) times the step's loss, ``||grad L|| / |L| = ||grad log L||``,
      which multiplying the loss by a constant does not change (healthy runs of the pathology zoo and of the
      committed studies stay below ~40; IRNNs whose recurrence explodes sit at 1e3 to 1e10 from their first step,
      before any median exists), or above ``exploding_threshold``, an absolute ceiling, off by default (no absolute
      number is large for every model). Other spikes are reported as *transient*: a healthy run with rare hard
      batches has them;
    - a run's gradient has *collapsed* when the median total norm of its latest records is ``collapse_factor``
      (100x) below the largest such median earlier in the run (unless an explosion reached that level: norms
      falling back after one are no collapse), although no layer need be below the vanishing floor: every layer
      got quieter together, as when a loss saturates (a GAN discriminator that wins outright took the generator's
      gradient 736x down in 2,500 steps; the classifiers of this project's studies fell at most 5.1x, see
      `gradient_collapse`).

    The first ``warmup_steps`` steps also do not count toward "vanished earlier" or the worst depth ratio: a
    zero-initialised layer (a LoRA ``B``) gives its partner an exactly zero gradient at step 0, by design.

    Raises:
        ValueError: If a value has the wrong type, lies out of range, or the thresholds are inverted.
    """

    vanishing_threshold: float = 1e-8
    vanishing_ratio: float = 1e-5
    exploding_threshold: float | None = None
    exploding_factor: float = 10.0
    median_window: int = 64
    collapse_factor: float = 100.0
    warmup_steps: int = 16
    spike_persistence: int = 32
    gradient_to_loss_ceiling: float | None = 1e3

    def __post_init__(self) -> None:
        for name in ("vanishing_threshold", "exploding_factor"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a positive finite number, got {value!r}.")
        threshold = self.exploding_threshold
        if threshold is not None:
            if not (_is_number(threshold) and math.isfinite(threshold) and threshold > 0):
                raise ConfigurationError(
                    f"exploding_threshold must be None or a positive finite number, got {threshold!r}."
                )
            if self.vanishing_threshold >= threshold:
                raise ConfigurationError(
                    f"vanishing_threshold ({self.vanishing_threshold}) must be below exploding_threshold ({threshold})."
                )
        if not (_is_number(self.vanishing_ratio) and 0 < self.vanishing_ratio < 1):
            raise ConfigurationError(f"vanishing_ratio must be in (0, 1), got {self.vanishing_ratio!r}.")
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
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 1):
            raise ConfigurationError(f"warmup_steps must be a positive integer, got {self.warmup_steps!r}.")
        ceiling = self.gradient_to_loss_ceiling
        if ceiling is not None and not (_is_number(ceiling) and math.isfinite(ceiling) and ceiling > 0):
            raise ConfigurationError(
                f"gradient_to_loss_ceiling must be None or a positive finite number, got {ceiling!r}."
            )
        if not (_is_int(self.spike_persistence) and self.spike_persistence >= 1):
            raise ConfigurationError(f"spike_persistence must be a positive integer, got {self.spike_persistence!r}.")

    @property
    def judged_after(self) -> int:
        """Norms the running-median window must hold before spikes are judged (a window smaller than
        ``warmup_steps`` is judged once full)."""
        return min(self.warmup_steps, self.median_window)

    def vanishing_floor(self, largest: float, converged: bool = False) -> float:
        """The norm below which a layer is vanishing, given the largest layer norm of the step. With ``converged``
        (the training loss fell by most of its range), the absolute ``vanishing_threshold`` counts only while some
        layer is above it: every gradient of a model that fitted its data is near zero, and that is no vanishing."""
        relative = self.vanishing_ratio * largest
        if converged and largest < self.vanishing_threshold:
            return relative
        return max(self.vanishing_threshold, relative)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
