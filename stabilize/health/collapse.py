"""Gradient collapse: a run whose total gradient norm fell by orders of magnitude below its own earlier level."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from stabilize.health.records import ExplosionEvent, GradientCollapse, LossPoint

#: Fewer records than this say nothing about a trend.
MIN_RECORDS = 20


def gradient_collapse(history: Sequence[LossPoint], factor: float) -> GradientCollapse | None:
    """The collapse of a run's total gradient norm, or ``None``.

    Medians over windows of a twentieth of the records (at least 3) smooth single-step noise; the latest window is
    compared with the largest window median before it. A run whose latest median is ``factor`` times smaller has
    collapsed; ``since_step`` is where the window medians fell below ``largest / factor`` for good.
    """
    norms = [(r["step"], r["global_norm"]) for r in history if math.isfinite(r["global_norm"]) and r["global_norm"] > 0]
    if len(norms) < MIN_RECORDS:
        return None
    width = max(3, len(norms) // 20)
    medians = [statistics.median(norm for _, norm in norms[i : i + width]) for i in range(len(norms) - width + 1)]
    latest = medians[-1]
    earlier = medians[: len(medians) - width]
    peak = max(range(len(earlier)), key=earlier.__getitem__)
    if earlier[peak] < factor * latest:
        return None
    floor = earlier[peak] / factor
    since = len(medians) - 1
    while since - 1 > peak and medians[since - 1] < floor:
        since -= 1
    return {
        "factor": earlier[peak] / latest,
        "from_norm": earlier[peak],
        "from_step": norms[peak][0],
        "to_norm": latest,
        "since_step": norms[since + width - 1][0],
    }


def loss_fell_with_it(history: Sequence[LossPoint], collapse: GradientCollapse) -> bool:
    """Whether the training loss fell over the collapse by more than half its range over the run: a model that
    converged (a classifier certain of its answers) has a small gradient because its loss is small, not because a
    saturated loss stopped the learning signal. Loss differences against the loss's own range: free of its scale
    and sign (a GAN generator's minimax loss is negative)."""
    losses = [(r["step"], r["loss"]) for r in history if math.isfinite(r.get("loss", math.nan))]
    if len(losses) < MIN_RECORDS:
        return False
    width = max(3, len(losses) // 20)
    around = [loss for step, loss in losses if step <= collapse["from_step"]][-width:]
    latest = [loss for _, loss in losses[-width:]]
    values = [loss for _, loss in losses]
    span = max(values) - min(values)
    if not around or span <= 0:
        return False
    return (statistics.median(around) - statistics.median(latest)) / span > 0.5


def judged_collapse(
    history: Sequence[LossPoint], explosions: Sequence[ExplosionEvent], factor: float
) -> GradientCollapse | None:
    """`gradient_collapse`, unless something else explains the fall: norms falling back after an explosion
    that reached the earlier level are no collapse (small spikes within a collapsed run do not undo one), and a
    gradient that fell because the loss fell is convergence."""
    collapse = gradient_collapse(history, factor)
    if collapse and any(event["max_norm"] >= collapse["from_norm"] for event in explosions):
        return None
    if collapse and loss_fell_with_it(history, collapse):
        return None
    return collapse
