"""Which spikes are explosions: each rule on hand-made records (plain data, no torch)."""

from __future__ import annotations

import math

import pytest

from stabilize.health import HealthCriteria, classify_spikes
from stabilize.health.collapse import loss_fell_with_it
from stabilize.health.explosions import merge_runs
from tests.helpers.health import spike


def history(losses: list[float], every: int = 10) -> list[dict]:
    return [{"step": i * every, "loss": loss, "global_norm": 1.0} for i, loss in enumerate(losses)]


CRITERIA = HealthCriteria()


def test_a_spike_the_loss_shrugs_off_is_transient() -> None:
    # Loss falling 2.0 -> 0.5, one spike at step 105 (record 110), the loss keeps falling.
    records = history([2.0 - 0.05 * i for i in range(30)])
    explosions, transient = classify_spikes([spike(105, record_step=110)], records, [], CRITERIA)
    assert explosions == [] and [e["first_step"] for e in transient] == [105]


def test_a_spike_after_which_the_loss_never_comes_back_is_an_explosion_whatever_its_scale_and_sign() -> None:
    losses = [2.0 - 0.1 * i for i in range(11)] + [2.5] * 10  # 2.0 -> 1.0, then back above the start
    for scale in (1.0, 1e-3, 1e3, -1.0):
        records = history([scale * loss if scale > 0 else -(3.0 - loss) for loss in losses])
        (explosion,) = classify_spikes([spike(105, record_step=110)], records, [], CRITERIA)[0]
        assert explosion["rule"] == "loss", scale


def test_a_loss_a_little_worse_after_an_outlier_or_a_run_without_progress_is_not_judged_by_the_loss() -> None:
    slightly_worse = history([2.0 - 0.1 * i for i in range(11)] + [1.1] * 10)  # lost 10% of the progress
    assert classify_spikes([spike(105, record_step=110)], slightly_worse, [], CRITERIA)[0] == []
    flat = history([1.0] * 10 + [1.5] * 10)  # no progress before the spike: a GAN's losses, a plateau
    assert classify_spikes([spike(95, record_step=100)], flat, [], CRITERIA)[0] == []
    too_late = history([2.0 - 0.1 * i for i in range(11)] + [2.5] * 2)  # two records after: not enough to judge
    assert classify_spikes([spike(105, record_step=110)], too_late, [], CRITERIA)[0] == []


def test_nonfinite_gradients_after_a_spike_make_it_an_explosion() -> None:
    nonfinite = [{"first_step": 130, "last_step": 140, "tensors": 3, "layers": ["fc"]}]
    records = history([1.0] * 20)
    (explosion,) = classify_spikes([spike(120)], records, nonfinite, CRITERIA)[0]
    assert explosion["rule"] == "nonfinite"
    assert classify_spikes([spike(20)], records, nonfinite, CRITERIA)[0] == []  # 110 steps earlier: unrelated


def test_a_run_cut_by_logging_steps_is_judged_as_one() -> None:
    parts = [spike(5, 8, persistent_steps=0, longest_run=4), spike(9, 12, persistent_steps=0, longest_run=8)]
    (merged,) = merge_runs(parts)
    assert (merged["first_step"], merged["last_step"], merged["steps"], merged["longest_run"]) == (5, 12, 8, 8)
    assert len(merge_runs([spike(5), spike(7)])) == 2
    # A GAN's generator steps once in six global steps (five discriminator steps): its next step after 5 is 11.
    generator_steps = list(range(5, 100, 6))
    assert len(merge_runs([spike(5), spike(11)], generator_steps)) == 1
    assert len(merge_runs([spike(5), spike(17)], generator_steps)) == 2
    # A long run's trace point stands for 4 steps: events within a point's span are one run, as the loss rules see it.
    assert len(merge_runs([spike(5), spike(8)], list(range(0, 100, 4)))) == 1
    assert len(merge_runs([spike(5), spike(10)], list(range(0, 100, 4)))) == 2


def test_a_gradient_that_fell_with_its_loss_is_convergence_not_collapse() -> None:
    collapse = {"factor": 1e4, "from_norm": 1.0, "from_step": 0, "to_norm": 1e-4, "since_step": 200}
    converged = history([1.4 * math.exp(-i / 5) for i in range(40)])
    stuck = history([-0.69 + 0.69 * (1 - math.exp(-i / 5)) for i in range(40)])  # minimax G: loss rises to 0
    assert loss_fell_with_it(converged, collapse)  # type: ignore[arg-type]
    assert not loss_fell_with_it(stuck, collapse)  # type: ignore[arg-type]


@pytest.mark.parametrize("persistent", [0, 3])
def test_a_persistent_run_is_an_explosion(persistent: int) -> None:
    explosions, transient = classify_spikes(
        [spike(100, 140, persistent_steps=persistent)], history([1.0] * 20), [], CRITERIA
    )
    assert (len(explosions), len(transient)) == ((1, 0) if persistent else (0, 1))
