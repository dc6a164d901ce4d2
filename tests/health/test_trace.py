from __future__ import annotations

import math
import random

import pytest

from stabilize.health import trace as trace_module
from stabilize.health.trace import StepTrace, trailing_median


def steps_and_values(count: int, seed: int = 0) -> tuple[list[int], list[float], list[float]]:
    rng = random.Random(seed)
    losses = [rng.uniform(0.5, 3.0) for _ in range(count)]
    norms = [rng.uniform(0.1, 10.0) for _ in range(count)]
    losses[7] = math.nan  # a step without a loss
    norms[11] = math.inf  # a step with a non-finite norm
    return list(range(count)), losses, norms


def fed_in_pieces(size: int, count: int = 200) -> StepTrace:
    steps, losses, norms = steps_and_values(count)
    trace = StepTrace()
    for start in range(0, count, size):
        trace.extend(steps[start : start + size], losses[start : start + size], norms[start : start + size])
    return trace


@pytest.mark.parametrize("size", [5, 50, 64, 200])
def test_the_trace_is_the_same_however_the_steps_arrive(size: int) -> None:
    # What arrives with each logging step depends on the cadence; the trace must not.
    assert fed_in_pieces(size).points() == fed_in_pieces(1).points()


def test_missing_losses_and_non_finite_norms_are_left_out() -> None:
    points = fed_in_pieces(1).points()
    assert math.isnan(points[7]["loss"]) and math.isnan(points[11]["global_norm"])
    assert math.isfinite(points[7]["smoothed_loss"])  # the median of the finite losses before it


def test_a_long_run_is_averaged_in_pairs_to_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_module, "MAX_POINTS", 16)
    steps = list(range(100))
    losses = [float(i) for i in steps]
    trace = StepTrace()
    trace.extend(steps, losses, [1.0] * 100)
    points = trace.points()
    # 100 steps into at most 16 points: 8 steps a point (12 full points and the open one of 4 steps).
    assert trace.resolution == 8 and len(points) == 13
    assert [p["step"] for p in points] == list(range(0, 100, 8))
    # Each point is the mean of its steps (means of equal-sized halves, exact in binary for these integers).
    assert [p["loss"] for p in points] == [
        sum(range(s, min(s + 8, 100))) / len(range(s, min(s + 8, 100))) for s in range(0, 100, 8)
    ]


def test_the_state_round_trips() -> None:
    trace = fed_in_pieces(7, count=123)
    restored = StepTrace.from_state_dict(trace.state_dict())
    assert _same_with_nan(restored.points(), trace.points())
    steps, losses, norms = steps_and_values(20, seed=1)
    trace.extend([s + 123 for s in steps], losses, norms)
    restored.extend([s + 123 for s in steps], losses, norms)
    assert _same_with_nan(restored.points(), trace.points())


def _same_with_nan(a: list, b: list) -> bool:
    def key(point: dict) -> tuple:
        return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in point.values())

    return [key(p) for p in a] == [key(p) for p in b]


def test_trailing_median_uses_only_earlier_finite_values() -> None:
    assert trailing_median([1.0, 9.0, 2.0, math.nan, 3.0], 3) == [1.0, 5.0, 2.0, 5.5, 2.5]
    assert math.isnan(trailing_median([math.nan], 8)[0])
