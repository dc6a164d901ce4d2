"""The monitor's chunked count of the explosion rules equals the step-by-step count, whatever the chunk size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilize.health import GradientMonitor, HealthCriteria, LayerIndex
from stabilize.health import monitor as monitor_module
from stabilize.health.counters import DeviceCounters
from tests.health.step_by_step import count_step_by_step

STEPS = 70


def sequence(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per-tensor gradient norms (6 tensors) and losses of ``STEPS`` steps with what the rules look for: isolated
    spikes, a run of spikes, NaN and Inf tensors, losses so small that the gradient is out of range, a NaN loss."""
    generator = torch.Generator().manual_seed(seed)
    norms = torch.exp(torch.randn(STEPS, 6, generator=generator) * 0.3)
    spikes = torch.rand(STEPS, generator=generator) < 0.08
    norms[spikes] *= 60
    norms[30 + seed : 38 + seed] *= 200  # a run longer than the persistence
    norms[torch.rand(STEPS, 6, generator=generator) < 0.02] = math.nan
    norms[torch.rand(STEPS, 6, generator=generator) < 0.01] = math.inf
    losses: list[torch.Tensor | None] = [torch.rand((), generator=generator) + 0.5 for _ in range(STEPS)]
    for step in range(50 + seed, 58 + seed):
        losses[step] = torch.tensor(1e-3)  # gradient ~2e3x the loss: out of range, 8 in a row
    if seed == 2:
        losses[3] = torch.tensor(math.nan)  # the interval's mean loss is then NaN, as the step-by-step sum says
    return list(norms), losses


def monitor_with_gradients(criteria: HealthCriteria) -> tuple[GradientMonitor, list[nn.Parameter]]:
    net = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1))
    monitor = GradientMonitor(criteria)
    monitor.attach(LayerIndex.build(net, net.parameters()))
    assert monitor.layers is not None
    return monitor, list(monitor.layers.params)


def chunked(
    criteria: HealthCriteria, norms: list[torch.Tensor], losses: list, amp: bool, recent: list[float]
) -> tuple[DeviceCounters, torch.Tensor]:
    monitor, params = monitor_with_gradients(criteria)
    monitor._saved_norms = recent
    for step, (step_norms, loss) in enumerate(zip(norms, losses)):
        for param, norm in zip(params, step_norms):
            param.grad = torch.full_like(param, float(norm) / math.sqrt(param.numel()))
        monitor.observe(step, amp=amp, loss=loss)
    monitor._count_chunk()
    assert monitor.counters is not None and monitor.layers is not None
    return monitor.counters, monitor.layers.layer_index(tuple(range(len(params))), torch.device("cpu"))


@pytest.mark.parametrize("chunk_steps", [1, 7, 64])
@pytest.mark.parametrize(
    ("seed", "amp", "recent", "options"),
    [
        (0, False, [], {}),
        (1, False, [], {"exploding_threshold": 20.0}),
        (2, True, [], {}),
        (3, False, [1.0, 2.0, 40.0], {"gradient_to_loss_ceiling": None}),
    ],
)
def test_chunked_count_equals_the_step_by_step_count(
    chunk_steps: int, seed: int, amp: bool, recent: list[float], options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every counter agrees: integers exactly, floats to float32 rounding of sums taken in another order (a sum of
    at most 70 positive terms: relative error below 70 x 6e-8, checked at 1e-5)."""
    monkeypatch.setattr(monitor_module, "CHUNK_STEPS", chunk_steps)
    criteria = HealthCriteria(median_window=8, warmup_steps=4, spike_persistence=3, **options)
    norms, losses = sequence(seed)
    counters, layer_index = chunked(criteria, norms, losses, amp, recent)
    expected = count_step_by_step(criteria, norms, losses, list(range(STEPS)), layer_index, amp, recent)
    ours, theirs = counters.unpack(counters.pack().tolist()), expected.unpack(expected.pack().tolist())
    assert theirs["spikes"] > 0 and theirs["persistent_spikes"] > 0
    assert theirs["ceiling_steps"] > 0 or options.get("gradient_to_loss_ceiling", 1) is None
    assert ours.pop("layer_nonfinite") == theirs.pop("layer_nonfinite")
    assert ours == pytest.approx(theirs, rel=1e-5, nan_ok=True)


def test_a_step_without_a_loss_is_counted_with_the_others() -> None:
    criteria = HealthCriteria(median_window=8, warmup_steps=4)
    norms, losses = sequence(0)
    losses[10] = losses[11] = None
    counters, _ = chunked(criteria, norms, losses, False, [])
    assert counters.loss_count.item() == STEPS - 2
