"""GradientMonitor and its parts in plain torch: no Trainer anywhere in this file."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilize.health import DeviceCounters, GradientMonitor, HealthCriteria, LayerIndex
from stabilize.health.layers import ForwardOrder


class Net(nn.Module):
    """Registration order (head first) differs from forward order (body first)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def backward(net: nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    net.zero_grad()
    (net(torch.randn(16, 4, generator=generator)).square().mean() * scale).backward()


def monitored(net: nn.Module, **criteria: float) -> GradientMonitor:
    order = ForwardOrder()
    order.watch(net)
    net(torch.zeros(1, 4))
    order.stop()
    monitor = GradientMonitor(HealthCriteria(**criteria))  # type: ignore[arg-type]
    monitor.attach(LayerIndex.build(net, net.parameters(), order.order))
    return monitor


def test_layers_follow_the_forward_order_and_norms_equal_a_hand_computation() -> None:
    torch.manual_seed(0)
    net = Net()
    monitor = monitored(net)
    assert monitor.layers is not None and monitor.layers.names == ["body.0", "head"]
    backward(net)
    observation = monitor.observe(step=0)
    assert observation is not None
    record, extras = monitor.record(0, observation, [torch.tensor(0.25)])
    assert record is not None and extras == [0.25]
    expected = {
        name: math.sqrt(sum(p.grad.double().square().sum().item() for p in module.parameters()))
        for name, module in (("body.0", net.body[0]), ("head", net.head))
    }
    for name, norm in expected.items():
        assert record["layers"][name]["grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert record["global_norm"] == pytest.approx(math.hypot(*expected.values()), rel=1e-6)
    assert record["depth_ratio"] == pytest.approx(expected["body.0"] / expected["head"], rel=1e-6)


def test_spike_counted_on_the_device_between_records_and_flushed() -> None:
    torch.manual_seed(0)
    net = Net()
    monitor = monitored(net, median_window=4)
    for step in range(6):
        backward(net, scale=1e5 if step == 4 else 1.0)
        observation = monitor.observe(step)
        if step == 0:
            assert observation is not None
            monitor.record(step, observation)
    assert monitor.explosions == []  # still on the device
    monitor.flush()
    assert [(e["first_step"], e["steps"]) for e in monitor.explosions] == [(4, 1)]
    assert monitor.summary()["steps"] == 6


def test_state_dict_carries_unread_counters_and_the_median_window() -> None:
    torch.manual_seed(0)
    net = Net()
    monitor = monitored(net, median_window=4)
    for step in range(5):
        backward(net, scale=1e5 if step == 3 else 1.0)
        monitor.observe(step)
    state = monitor.state_dict()
    assert state["counters"]["exploding"] == 1 and len(state["norm_history"]) == 4
    restored = GradientMonitor.from_state_dict(state, monitor.criteria)
    restored.attach(LayerIndex.build(net, net.parameters()))
    backward(net)
    restored.observe(5)
    restored.flush()
    assert [(e["first_step"], e["last_step"]) for e in restored.explosions] == [(3, 3)]


def test_nonfinite_layers_are_named_in_forward_order_and_skip_drops_every_gradient() -> None:
    net = Net()
    monitor = monitored(net)
    backward(net)
    net.body[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
    net.head.bias.grad[0] = math.inf  # type: ignore[index]
    observation = monitor.observe(7)
    assert observation is not None
    assert monitor.nonfinite_layers(observation) == ["body.0", "head"]
    monitor.skip(7)
    assert all(p.grad is None for p in net.parameters()) and monitor.skipped_steps == [7]


def test_device_counters_schema_drives_pack_unpack_reset_and_load() -> None:
    counters = DeviceCounters.zeros(num_layers=3, device=torch.device("cpu"))
    assert counters.sizes() == [1] * 8 + [3]
    counters.exploding += 2
    counters.exploding_first.fill_(5)
    counters.layer_nonfinite[1] = 1
    values = counters.unpack(counters.pack().tolist())
    assert values["exploding"] == 2 and values["exploding_first"] == 5 and values["nonfinite_first"] == -1
    assert values["layer_nonfinite"] == [0.0, 1.0, 0.0] and isinstance(values["exploding"], int)
    counters.reset()
    assert counters.unpack(counters.pack().tolist())["exploding_first"] == -1
    counters.load(values)
    assert counters.unpack(counters.pack().tolist()) == values


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ({"median_window": float("nan")}, "median_window must be an integer"),
        ({"median_window": 10**9}, "median_window must be an integer from 3 to"),
        ({"vanishing_threshold": True}, "vanishing_threshold must be a positive finite"),
    ],
)
def test_criteria_validate_types(criteria: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthCriteria(**criteria)
