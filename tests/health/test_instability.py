"""Loss blow-ups on synthetic per-step traces whose outcome is known by construction."""

from __future__ import annotations

import math
import random

import pytest

from stabilize.health import verdict, verdict_class
from stabilize.health.criteria import HealthCriteria
from stabilize.health.diagnosis import diagnosis_lines
from stabilize.health.explosions import classify_spikes
from stabilize.health.instability import loss_blowups, unrecovered
from stabilize.health.trace import StepTrace, TracePoint
from stabilize.health.traits import ModelTraits, vanishing_remedies
from tests.helpers.health import health_summary, spike


def trace_of(losses: list[float], norms: list[float] | None = None) -> list[TracePoint]:
    trace = StepTrace()
    trace.extend(list(range(len(losses))), losses, norms or [1.0] * len(losses))
    return trace.points()


def noisy(values: list[float], spread: float = 0.05, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [v * (1 + rng.uniform(-spread, spread)) for v in values]


def blew_up_then_guessed(start: float = 4.16) -> list[float]:
    """AdamW far above its LR: the loss jumps 3x within 3 steps, stays up ~40 steps, falls back near its start."""
    return noisy([start, 7.0, 10.0] + [12.0] * 40 + [12.0 - 8 * i / 20 for i in range(20)] + [4.02] * 137)


def blew_up_then_learned(start: float = 4.27) -> list[float]:
    return noisy([start, 7.0, 11.0] + [12.0] * 40 + [max(1.5, 12.0 * 0.97**i) for i in range(157)])


def learned_with_a_late_spike() -> list[float]:
    learning = [2.3 * 0.99**i for i in range(150)]  # 2.3 -> 0.51
    return noisy(learning + [1.8] * 6 + [0.5 * 0.999**i for i in range(144)])


def test_a_blow_up_that_falls_back_to_guessing_is_unrecovered() -> None:
    (blowup,) = loss_blowups(trace_of(blew_up_then_guessed()))
    assert blowup["onset_step"] <= 5 and blowup["peak_loss"] > 11 and not blowup["recovered"]
    # Back below the bar near step 60 and not below the recovery bar in the 32 points after: confirmed then.
    assert blowup["back_step"] is not None and blowup["confirmed_step"] == blowup["back_step"] + 31


def test_a_blow_up_the_run_learns_past_is_recovered() -> None:
    (blowup,) = loss_blowups(trace_of(blew_up_then_learned()))
    assert blowup["recovered"] and blowup["end_loss"] < 2


def test_a_late_spike_back_to_the_progress_made_is_recovered_and_short_noise_is_nothing() -> None:
    (blowup,) = loss_blowups(trace_of(learned_with_a_late_spike()))
    assert 150 <= blowup["onset_step"] <= 156 and blowup["recovered"] and blowup["confirmed_step"] is None
    # A healthy run with 20% noise per step, falling steadily: no blow-up at all.
    assert loss_blowups(trace_of(noisy([2.3 * 0.995**i for i in range(400)], spread=0.2))) == []


def test_a_network_broken_at_its_start_is_unrecovered_even_below_its_start() -> None:
    # Dead units after the blow-up: the loss sits flat at the class prior, 29% below the start.
    losses = noisy([1.76, 500.0, 4000.0] + [3000.0 * 0.5**i + 1.25 for i in range(12)] + [1.25] * 285, spread=0.02)
    (blowup,) = loss_blowups(trace_of(losses))
    assert blowup["end_loss"] < 0.9 * blowup["start_loss"] and not blowup["recovered"]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_rules_are_free_of_the_loss_scale(scale: float) -> None:
    for losses, recovered in [(blew_up_then_guessed(), False), (blew_up_then_learned(), True)]:
        (blowup,) = loss_blowups(trace_of([scale * v for v in losses]))
        assert blowup["recovered"] is recovered


def test_non_positive_or_too_few_losses_are_not_judged() -> None:
    assert loss_blowups(trace_of([-v for v in blew_up_then_guessed()])) == []
    assert loss_blowups(trace_of([1.0, 9.0])) == []
    assert loss_blowups(trace_of([math.nan] * 50)) == []


def test_unstable_verdict_words_and_remedies_fit_a_transformer() -> None:
    (blowup,) = loss_blowups(trace_of(blew_up_then_guessed()))
    summary = health_summary(loss_blowups=[blowup])
    assert verdict_class(summary) == "unstable" and unrecovered([blowup]) == [blowup]
    assert verdict(summary).startswith("unstable (the loss blew up from step")
    lines = "\n".join(diagnosis_lines(summary, None, ModelTraits(attention=True, normalization=True)))
    assert "UNSTABLE" in lines and "lower the learning rate" in lines and "QK-norm" in lines
    # Explosions outrank it: the gradient rules have direct evidence.
    assert verdict_class(health_summary(loss_blowups=[blowup], explosions=[{"rule": "loss"}])) == "exploding"


def test_a_recovered_blow_up_is_a_note_on_a_healthy_verdict() -> None:
    (blowup,) = loss_blowups(trace_of(blew_up_then_learned()))
    summary = health_summary(loss_blowups=[blowup])
    assert verdict_class(summary) == "healthy"
    assert verdict(summary).startswith("healthy; 1 loss spike recovered from")


def test_a_transformer_is_not_told_to_add_residual_connections() -> None:
    assert not any("residual" in r for r in vanishing_remedies(ModelTraits(attention=True)))
    assert any("residual" in r for r in vanishing_remedies(ModelTraits(relu_like=True)))


def test_gradient_growth_while_the_loss_falls_is_no_explosion() -> None:
    # A model started near zero: its gradient outgrows the median for 40 steps while the loss falls 4.16 -> 3.
    losses = [4.16] * 50 + [4.16 - 1.16 * i / 40 for i in range(40)] + [3.0] * 110
    run = spike(50, 89, persistent_steps=9, longest_run=40, record_step=89)
    criteria = HealthCriteria()
    explosions, transient = classify_spikes([run], [], [], criteria, trace_of(losses))
    assert explosions == [] and len(transient) == 1
    # The same run of spikes with the loss rising is an explosion.
    rising = [4.16] * 50 + [4.16 + i for i in range(40)] + [44.0] * 110
    explosions, _ = classify_spikes([run], [], [], criteria, trace_of(rising))
    assert [e["rule"] for e in explosions] == ["persistent"]
