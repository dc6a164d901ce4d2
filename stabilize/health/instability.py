"""Loss blow-ups: the training loss rising far above its own start or best, and whether the run recovered.

An adaptive optimizer (Adam, AdamW) normalises its update, so at a learning rate far too high the loss blows up while
the gradient norm need not (it often *falls*, the model pinned in a flat region); the gradient rules cannot see it.
The loss can. These rules read the run's per-step trace (`StepTrace`), so they are
the same at any logging cadence, and use ratios and differences of the loss itself, so they are free of its scale.
Losses that are not positive (a log-likelihood, a GAN's minimax loss) have no such ratios and are not judged.

- The *bar* at a point: ``best + max((BLOWUP_FACTOR - 1) x best, (start - best) / 2)``, where ``start`` is the
  median of the first three points' losses and ``best`` the lowest median of 32 points so far. A run that has not
  learned yet (best = start) blows up above twice its start; one that has, when it gives back more than half of
  its progress (and at least doubles its best). ``start`` is the first step's loss, or the median of the first
  three if lower. A cross-entropy at twice its starting value is far worse than
  guessing; noise around a plateau never doubles a median of eight steps.
- A *blow-up* is a stretch of at least `MIN_BLOWUP_POINTS` points whose smoothed loss (median of the last
  eight) is above the bar frozen at its onset; one hard batch moves a median of eight by nothing.
- It is *recovered* when, by the end of the run, the loss (median of the last tenth of the points) is back within
  half the progress made before the blow-up *and* at least `LEARNED_BELOW_START` below the start: a run that
  blew up at its first steps and fell back to its starting loss has not learned (the AdamW runs of the pathology
  zoo at 100x their learning rate end within 3-6% of their start; the one that recovered ends 64% below).
  A blow-up before the run had learned anything (its best within that same fraction of the start) is recovered only
  if the loss after it is not flat (`loss_stall` of the points after it): a network
  the blow-up broke (its ReLU units dead) sits at the trivial loss, which can be well below its start. Recovered
  blow-ups are reported as transient; the others make the verdict ``unstable``.
- It is *confirmed* during training (an alert) once it has lasted `LASTING_POINTS` points, or once
  `CONFIRM_POINTS` points after its end have not brought the loss below the recovery bar. A run can recover
  from a blow-up (the zoo's litgpt GPT stays up for ~40 steps, then learns), so an alert waits for the outcome
  that tells the two apart: no recovery after the loss came down, or a loss that does not come down at all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from stabilize.health.records import LossBlowup
from stabilize.health.stall import loss_stall
from stabilize.health.trace import TracePoint

#: The smoothed loss must reach this multiple of its best (at least) to be a blow-up.
BLOWUP_FACTOR = 2.0
#: Points above the bar that make a blow-up (the smoothed loss is a median of eight: four points are eleven steps).
MIN_BLOWUP_POINTS = 4
#: A run recovered only if its final loss is at least this fraction below its start.
LEARNED_BELOW_START = 0.1
#: Points after a blow-up without recovery, and points of a blow-up still going on, that confirm it while the run
#: goes on (see the module's docstring).
CONFIRM_POINTS = 32
LASTING_POINTS = 64


def loss_blowups(points: Sequence[TracePoint]) -> list[LossBlowup]:
    """Every blow-up of the trace's loss, in order, each marked recovered or not (see the module's docstring);
    empty when the losses are not all positive or fewer than three are known."""
    known = [p for p in points if math.isfinite(p["loss"])]
    if len(known) < 3 or any(p["loss"] <= 0 for p in known):
        return []
    # The first step's loss, unless the next two say it was a lucky batch; not their median alone: an optimizer at
    # far too high a learning rate can blow the loss up from the second step.
    start = min(known[0]["loss"], statistics.median(p["loss"] for p in known[:3]))
    smoothed = [p["smoothed_loss"] for p in known]
    # The best so far from a four times longer median: the minimum of a noisy series is biased low (batches of two
    # examples make an eight-step median swing 5x), and a bar set from a lucky stretch would call the noise a blow-up.
    steady = [p["steady_loss"] for p in known]
    tenth = max(1, len(known) // 10)
    end = statistics.median(p["loss"] for p in known[-tenth:])
    blowups: list[LossBlowup] = []
    best = min(start, steady[0])
    i = 0
    while i < len(known):
        bar = best + max((BLOWUP_FACTOR - 1) * best, (start - best) / 2)
        if smoothed[i] <= bar:
            best = min(best, steady[i])
            i += 1
            continue
        onset = i
        while i < len(known) and smoothed[i] > bar:
            i += 1
        if i - onset < MIN_BLOWUP_POINTS and i < len(known):
            continue  # too short to be a trend, and over
        peak = max(range(onset, i), key=lambda j: smoothed[j])
        recovery_bar = min(best + (start - best) / 2, (1 - LEARNED_BELOW_START) * start)
        if i - onset >= LASTING_POINTS:
            confirm: int | None = onset + LASTING_POINTS - 1
        elif i + CONFIRM_POINTS <= len(known) and all(smoothed[j] > recovery_bar for j in range(i, i + CONFIRM_POINTS)):
            confirm = i + CONFIRM_POINTS - 1
        else:
            confirm = None  # not yet, or the loss came back below the recovery bar in time
        # Back where it started before learning anything, and flat since: a network broken by the blow-up (dead
        # units, a saturated output), however low the trivial loss it sits at.
        flat_after = best >= (1 - LEARNED_BELOW_START) * start and loss_stall(known[i:]) is not None
        blowups.append(
            {
                "onset_step": known[onset]["step"],
                "peak_step": known[peak]["step"],
                "peak_loss": smoothed[peak],
                "start_loss": start,
                "best_before": best,
                "back_step": known[i]["step"] if i < len(known) else None,
                "end_loss": end,
                "recovered": end <= recovery_bar and not flat_after,
                "confirmed_step": None if confirm is None else known[confirm]["step"],
            }
        )
    return blowups


def unrecovered(blowups: Sequence[LossBlowup]) -> list[LossBlowup]:
    """The blow-ups the run did not recover from (the verdict's ``unstable`` finding)."""
    return [b for b in blowups if not b["recovered"]]
