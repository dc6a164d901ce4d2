"""Loss stall: a run whose training loss stopped falling near its start, with most of the way still to go."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from stabilize.health.records import LossPoint, LossStall

#: Fewer records than this say nothing about a trend.
MIN_RECORDS = 20
#: The last tenth of the run within this fraction of the loss's level at 5-10% of the run: no progress since.
STALL_PROGRESS = 0.05
#: That level at least this fraction of the first records' loss: the early drop was not most of the learning (a
#: run that converges in its first twentieth and then polishes is not stalled).
EARLY_SHARE = 0.5


def loss_stall(history: Sequence[LossPoint]) -> LossStall | None:
    """The stall of a run's training loss, or ``None``.

    The records' interval losses: the median of the first three (``start``), of those from 5% to 10% of the run
    (``level``, after the quick early drop most runs make: a classifier learning the class frequencies, a language
    model the character frequencies) and of the last tenth (``end``). Stalled when ``end`` is within
    `STALL_PROGRESS` of ``level`` while ``level`` is still at least `EARLY_SHARE` of ``start``. Ratios
    only, so free of the loss's scale; losses that are not positive (a log-likelihood, a GAN's minimax loss) have
    no such ratios and are not judged.

    Checked against every committed study (docs/results): it fires on the runs that stayed at chance or at the
    frequency baseline (plain-20 at LR 0.05, the sigmoid plain nets, post-LN transformers without a warm-up, 10.0%
    and 16% test accuracy) and on none that learned; the pathology zoo's healthy cases never fire it.
    """
    losses = _finite(history)
    if len(losses) < MIN_RECORDS:
        return None
    count = len(losses)
    start, end = _start_and_end(losses)
    early = losses[count // 20 : count // 10 + 1]
    level = statistics.median(loss for _, loss in early)
    if not (start > 0 and level > 0) or level < EARLY_SHARE * start or end < (1 - STALL_PROGRESS) * level:
        return None
    return {"since_step": early[0][0], "start_loss": start, "level": level, "end_loss": end}


def loss_progress(history: Sequence[LossPoint]) -> float | None:
    """How far the training loss fell over the run, ``1 - end / start`` with `loss_stall`'s medians (the
    first three records, the last tenth): 0.9 for a loss that ended at a tenth of its start. ``None`` with fewer
    than `MIN_RECORDS` finite records or a start that is not positive (no ratio to take)."""
    losses = _finite(history)
    if len(losses) < MIN_RECORDS:
        return None
    start, end = _start_and_end(losses)
    return 1.0 - end / start if start > 0 else None


def _finite(history: Sequence[LossPoint]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in history if math.isfinite(r.get("loss", math.nan))]


def _start_and_end(losses: list[tuple[int, float]]) -> tuple[float, float]:
    start = statistics.median(loss for _, loss in losses[:3])
    return start, statistics.median(loss for _, loss in losses[-(len(losses) // 10) :])
