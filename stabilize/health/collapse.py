"""Gradient collapse: a run whose total gradient norm fell by orders of magnitude below its own earlier level."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from stabilize.health.records import GradientCollapse, StepRecord

#: Fewer records than this say nothing about a trend.
MIN_RECORDS = 20


def gradient_collapse(history: Sequence[StepRecord], factor: float) -> GradientCollapse | None:
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
