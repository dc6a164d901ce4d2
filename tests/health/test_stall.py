from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stabilize.health import loss_stall, verdict, verdict_class
from stabilize.health.diagnosis import diagnosis_lines
from tests.helpers.health import health_summary


def records(losses: list[float], every: int = 10) -> list[dict]:
    return [{"step": i * every, "global_norm": 1.0, "loss": loss} for i, loss in enumerate(losses)]


def plateau(start: float = 4.2, level: float = 3.3, count: int = 100) -> list[float]:
    """A language model that learns the character frequencies in three records, then nothing (post-LN, no warm-up)."""
    wobble = [0.02 * math.sin(i) for i in range(count)]
    return [start, 3.8, 3.5] + [level + w for w in wobble[3:]]


def test_a_loss_flat_after_its_first_drop_has_stalled() -> None:
    stall = loss_stall(records(plateau()))
    assert stall is not None
    # The level is the median of records 5 to 10 (count // 20 to count // 10), the end that of the last ten.
    assert stall["since_step"] == 50 and stall["start_loss"] == pytest.approx(3.8)
    assert stall["level"] == pytest.approx(3.3, abs=0.02) and stall["end_loss"] == pytest.approx(3.3, abs=0.02)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_rule_is_free_of_the_loss_scale(scale: float) -> None:
    stalled, learning = plateau(), [4.2 * 0.98**i for i in range(100)]
    assert loss_stall(records([scale * v for v in stalled])) is not None
    assert loss_stall(records([scale * v for v in learning])) is None


def test_a_run_that_converged_in_its_first_steps_is_not_stalled() -> None:
    # 2.3 -> 0.1 within the first twentieth, then polishing: the early drop was most of the learning.
    fast = [2.3, 1.0, 0.3] + [0.1 - 0.0001 * i for i in range(97)]
    assert loss_stall(records(fast)) is None


def test_five_percent_of_progress_after_the_start_is_enough() -> None:
    slow = [2.31] * 10 + [2.31 - 0.15 * i / 90 for i in range(90)]  # 2.31 -> 2.16: 6.5% below the level
    assert loss_stall(records(slow)) is None
    slower = [2.31] * 10 + [2.31 - 0.08 * i / 90 for i in range(90)]  # 2.31 -> 2.23: 3.5%
    assert loss_stall(records(slower)) is not None


def test_short_histories_non_positive_and_non_finite_losses_say_nothing() -> None:
    assert loss_stall(records(plateau(count=19))) is None
    assert loss_stall(records([-v for v in plateau()])) is None  # a log-likelihood: no ratios
    assert loss_stall(records([math.nan] * 100)) is None
    assert loss_stall([{"step": i, "global_norm": 1.0} for i in range(100)]) is None  # no loss recorded


def test_the_verdict_and_the_diagnosis_name_the_stall() -> None:
    stall = {"since_step": 50, "start_loss": 4.2, "level": 3.32, "end_loss": 3.30}
    summary = health_summary(loss_stall=stall)
    assert verdict(summary) == "loss stalled (3.3 at the end, 3.32 at step 50)"
    assert verdict_class(summary) == "stalled"
    lines = diagnosis_lines(summary, None, hints={"stalled": "post-LN needs a warm-up"})
    assert any(line.startswith("  STALLED: the training loss has not fallen since step 50") for line in lines)
    assert lines[-1].startswith("  What to do: post-LN needs a warm-up; a stalled loss: try another learning rate")
    # Vanishing layers are the cause when there are some: the class says so, the stall is still named.
    both = health_summary(loss_stall=stall, vanishing_layers_now={"layer1": 10})
    assert verdict_class(both) == "vanishing" and "loss stalled" in verdict(both)


REPOSITORY = Path(__file__).resolve().parents[2]


def learned(result: dict) -> bool:
    """Whether a committed run learned beyond its task's trivial baseline: twice chance accuracy on CIFAR-10 (10
    classes), below 90% of the adding problem's 0.167 MSE (predicting the mean), below 95% of the 3.356 nats of
    predicting each character's frequency."""
    if result.get("test_acc") is not None:
        return result["test_acc"] >= 0.2
    if result.get("val_loss") is not None and result.get("test_loss") is None:
        return result["val_loss"] < 0.95 * 3.356
    return result["test_loss"] < 0.9 * 0.167


def test_against_the_committed_studies_it_fires_only_on_runs_that_learned_nothing() -> None:
    fired, judged = [], 0
    for path in sorted(REPOSITORY.glob("docs/results/*/*/gradient_health.json")):
        saved = json.loads(path.read_text())
        if len(saved["summary"]) > 1:
            continue  # several optimizers: not judged
        (records,) = saved["history"].values()
        judged += 1
        if loss_stall(records) is not None:
            result = json.loads((path.parent / "result.json").read_text())
            assert not learned(result), path.parent
            fired.append(path.parent.name)
    # Plain nets at chance, BatchNorm-56/plain-56 at 16-17%, tanh RNNs at the adding baseline, stalled post-LN.
    assert judged >= 70 and len(fired) >= 15
    assert {"plain-20", "plain-20-sigmoid", "post-nowarmup-lr0.001", "adding100-tanh"} <= set(fired)
