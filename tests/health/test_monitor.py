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
    assert monitor.spikes == []  # still on the device
    monitor.flush()
    assert [(e["first_step"], e["steps"], e["longest_run"]) for e in monitor.spikes] == [(4, 1, 1)]
    assert monitor.spikes[0]["peak_ratio"] > 1e4 and monitor.spikes[0]["record_step"] == 5
    summary = monitor.summary()
    assert summary["steps"] == 6 and summary["explosions"] == []  # one spike, nothing after it: transient
    assert [e["first_step"] for e in summary["transient_spikes"]] == [4]


def test_no_spike_is_judged_during_the_warm_up() -> None:
    torch.manual_seed(0)
    net = Net()
    monitor = monitored(net, warmup_steps=8)
    for step in range(12):
        backward(net, scale=1e5 if step in (3, 10) else 1.0, seed=step)
        monitor.observe(step)
    monitor.flush()
    assert [e["first_step"] for e in monitor.spikes] == [10]


def test_multiplying_the_loss_by_a_constant_changes_no_spike() -> None:
    def spikes(scale: float) -> list[tuple[int, int]]:
        torch.manual_seed(0)
        net = Net()
        monitor = monitored(net, median_window=8, spike_persistence=5)
        for step in range(40):
            backward(net, scale=scale * (30.0 if step in (20, 31, 32, 33, 34, 35, 36) else 1.0), seed=step)
            monitor.observe(step)
        monitor.flush()
        return [(e["first_step"], e["persistent_steps"]) for e in monitor.spikes]

    # One event (read once): the isolated step 20 and the run 31-36, whose fifth step is persistent; in a window of
    # 8 the run's later steps lift the median, so the run ends when the median catches up.
    assert spikes(1.0) == spikes(1e-3) == spikes(1e3) == [(20, 1)]


def test_a_run_of_spikes_is_persistent_and_an_absolute_ceiling_is_opt_in() -> None:
    torch.manual_seed(0)
    net = Net()
    monitor = monitored(net, median_window=16, warmup_steps=4, spike_persistence=3)
    for step in range(14):
        backward(net, scale=10.0 ** max(0, step - 7), seed=step)  # x10 every step from step 8
        monitor.observe(step)
    monitor.flush()
    (event,) = monitor.spikes
    # Step 8 is exactly 10x the median (not above); steps 9-13 are a run of 5, persistent from its third.
    assert (event["first_step"], event["longest_run"], event["persistent_steps"]) == (9, 5, 3)
    assert [e["rule"] for e in monitor.summary()["explosions"]] == ["persistent"]
    ceiling = monitored(net, exploding_threshold=1e-6)
    for step in range(6):
        backward(net, seed=step)
        ceiling.observe(step)
    ceiling.flush()
    # Out of range from step 0 (no warm-up: a ceiling needs no median); 5 in a row are an explosion.
    assert ceiling.spikes[0]["ceiling_steps"] == 6 and ceiling.spikes[0]["persistent_ceiling"] == 2
    assert ceiling.summary()["explosions"][0]["rule"] == "ceiling"


def test_a_gradient_far_out_of_proportion_to_its_loss_is_out_of_range_whatever_the_scale() -> None:
    def events(loss_value: float, scale: float) -> list[tuple[int, int]]:
        torch.manual_seed(0)
        net = Net()
        monitor = monitored(net)
        for step in range(8):
            backward(net, scale=scale, seed=step)
            monitor.observe(step, loss=torch.tensor(loss_value * scale))
        monitor.flush()
        return [(e["ceiling_steps"], e["persistent_ceiling"]) for e in monitor.spikes]

    # Net's gradient norms are O(0.1-1): a loss of 1e-6 makes them ~1e5x the loss, a loss of 1 about 1x.
    assert events(1e-6, 1.0) == events(1e-6, 1e3) == [(8, 4)]
    assert events(1.0, 1.0) == events(1.0, 1e-3) == []


def test_a_monitor_restored_from_its_state_dict_saves_the_same_state_and_counts_on_alike() -> None:
    torch.manual_seed(0)
    net = Net()
    monitor = monitored(net, median_window=4)
    for step in range(6):
        backward(net, scale=1e5 if step == 4 else 1.0, seed=step)
        observation = monitor.observe(step, loss=torch.tensor(1.0))
        if step in (0, 5):
            assert observation is not None
            monitor.record(step, observation)
    monitor.note_learning_rates({id(p) for p in net.parameters()})
    monitor.stopped_by = "KeyboardInterrupt"
    state = monitor.state_dict()
    restored = GradientMonitor.from_state_dict(state, monitor.criteria)
    assert restored.state_dict() == state
    assert restored.stopped_by is None  # the exception ended the previous fit, not the next one
    assert restored.spikes == monitor.spikes != [] and restored.gradient_layers == {"body.0", "head"}
    restored.attach(monitor._layers())
    for resumed in (monitor, restored):
        backward(net, scale=1e5, seed=6)
        resumed.observe(6, loss=torch.tensor(1.0))
        resumed.flush()
    assert restored.spikes == monitor.spikes and len(monitor.spikes) == 2


def test_a_state_dict_from_before_the_spike_rules_loads_with_the_defaults_of_what_it_lacks() -> None:
    monitor = monitored(Net())
    state = monitor.state_dict()
    for key in ("spikes", "worst_temporal_ratio", "last_temporal_ratio", "dead_units", "gradient_layers", "last_step"):
        del state[key]
    state["explosions"] = [{"step": 3}]  # the 10x rule's events, not carried over
    restored = GradientMonitor.from_state_dict({**state, "worst_depth_ratio": [0.5, 7]}, HealthCriteria())
    assert restored.spikes == [] and restored.last_step == -1 and restored.gradient_layers == set()
    assert restored.worst_depth_ratio == (0.5, 7) and restored.worst_temporal_ratio is None


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
    assert counters.sizes() == [1] * 17 + [3, 1, 1, 1]
    counters.spikes += 2
    counters.spike_first.fill_(5)
    counters.spike_run.fill_(4)
    counters.layer_nonfinite[1] = 1
    values = counters.unpack(counters.pack().tolist())
    assert values["spikes"] == 2 and values["spike_first"] == 5 and values["nonfinite_first"] == -1
    assert values["layer_nonfinite"] == [0.0, 1.0, 0.0] and isinstance(values["spikes"], int)
    counters.reset()
    after_reset = counters.unpack(counters.pack().tolist())
    assert after_reset["spike_first"] == -1 and after_reset["spike_run"] == 4  # a run of spikes spans records
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
