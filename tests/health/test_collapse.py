from __future__ import annotations

import math

import pytest

from stabilize.health import HealthCriteria, gradient_collapse
from stabilize.health.diagnosis import diagnosis_lines, verdict
from tests.helpers.health import health_summary, spike


def records(norms: list[float], every: int = 10) -> list[dict]:
    return [{"step": i * every, "global_norm": norm} for i, norm in enumerate(norms)]


def test_a_steady_run_has_not_collapsed() -> None:
    noisy = [1.0 + 0.5 * math.sin(i) for i in range(100)]
    assert gradient_collapse(records(noisy), 100.0) is None


def test_a_run_that_fell_a_thousandfold_has_collapsed_since_it_stayed_down() -> None:
    norms = [1.0] * 30 + [10.0 ** (-3 * i / 20) for i in range(20)] + [1e-3] * 50
    collapse = gradient_collapse(records(norms), 100.0)
    assert collapse is not None
    assert collapse["factor"] == pytest.approx(1000.0) and collapse["from_norm"] == 1.0
    assert collapse["to_norm"] == pytest.approx(1e-3)
    # The window medians drop below 1/100 once the decay passes 1e-2 (i = 14 of the ramp) and its window is full.
    assert 30 * 10 + 14 * 10 <= collapse["since_step"] <= (30 + 20 + 5) * 10


def test_short_histories_and_non_finite_norms_say_nothing() -> None:
    assert gradient_collapse(records([1.0] * 10 + [1e-6] * 9), 100.0) is None
    assert gradient_collapse(records([float("nan")] * 100), 100.0) is None


def test_the_factor_is_a_criterion() -> None:
    with pytest.raises(ValueError, match="collapse_factor"):
        HealthCriteria(collapse_factor=1.0)
    norms = [1.0] * 50 + [0.05] * 50
    assert gradient_collapse(records(norms), HealthCriteria(collapse_factor=10).collapse_factor) is not None
    assert gradient_collapse(records(norms), HealthCriteria().collapse_factor) is None


def test_the_diagnosis_names_the_collapse_and_the_models_vanishing_hint() -> None:
    collapse = {"factor": 736.0, "from_norm": 1.12, "from_step": 1, "to_norm": 1.5e-3, "since_step": 1001}
    summary = health_summary(
        steps=2500, worst_depth_ratio=None, last_global_norm=1.5e-3, num_layers=7, gradient_collapse=collapse
    )
    lines = "\n".join(diagnosis_lines(summary, None, None, {"vanishing": "the discriminator wins"}))
    assert "COLLAPSED: the total gradient norm fell 736x" in lines and "since step 1001" in lines
    assert "the discriminator wins" in lines
    assert verdict(summary) == "gradient collapsed (736x down)"


def test_small_spikes_inside_a_collapsed_run_do_not_hide_it_but_a_real_explosion_does() -> None:
    from stabilize.health import GradientMonitor, HealthCriteria

    monitor = GradientMonitor(HealthCriteria())
    history = [{**r, "vanishing_layers": [], "layers": {}} for r in records([1.0] * 50 + [1e-3] * 50)]
    monitor.history = history  # type: ignore[assignment]
    monitor.spikes = [spike(900, 904, max_norm=0.02, persistent_steps=1)]  # type: ignore[list-item]
    assert monitor.summary()["gradient_collapse"] is not None
    monitor.spikes = [spike(10, 14, max_norm=1e6, persistent_steps=1)]  # type: ignore[list-item]
    assert monitor.summary()["gradient_collapse"] is None
