from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from stabilize.callbacks import GradientClipping, GradientHealthCallback
from stabilize.datamodules import AddingProblemDataModule
from stabilize.models import RecurrentNet
from tests.callbacks.helpers import TinyMLP
from tests.helpers.trainer import quiet_trainer


class SeenByOptimizer(Callback):
    """After the clipper: the total norm and per-unit ratios the optimizer is about to use, and the limit."""

    def __init__(self, clipper: GradientClipping) -> None:
        self.clipper = clipper
        self.norms: list[float] = []
        self.limits: list[float] = []
        self.unit_ratios: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads)).item())
        self.limits.append(float(self.clipper._states[0].threshold))
        for p in pl_module.parameters():
            if p.grad is not None and p.ndim > 1:
                ratio = p.grad.flatten(1).norm(dim=1) / p.detach().flatten(1).norm(dim=1).clamp(min=1e-3)
                self.unit_ratios.append(ratio.max().item())


def exploding_rnn_fit(tmp_path, clipper: GradientClipping, steps: int = 12):
    seed_everything(0)
    data = AddingProblemDataModule(seq_len=40, batch_size=32, train_batches=steps, val_size=0, test_size=0)
    model = RecurrentNet(cell="rnn_relu", init="identity", recurrent_gain=1.15, hidden_size=32, lr=1e-3)
    probe = SeenByOptimizer(clipper)
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[health, clipper, probe]).fit(model, data)
    return health, probe


@pytest.mark.parametrize(
    "clipper",
    [
        pytest.param(lambda: GradientClipping(method="norm", max_norm=1.0), id="norm"),
        pytest.param(lambda: GradientClipping(method="autoclip", percentile=10, window=8), id="autoclip"),
        pytest.param(lambda: GradientClipping(method="zclip", z=2.0, warmup_steps=3), id="zclip"),
    ],
)
def test_the_norm_the_optimizer_sees_stays_at_or_below_the_limit(clipper, tmp_path) -> None:
    clip = clipper()
    health, probe = exploding_rnn_fit(tmp_path, clip)
    limited = [(n, limit) for n, limit in zip(probe.norms, probe.limits) if limit != float("inf")]
    assert limited, "the limit never became finite"
    # The health callback saw the gradients before clipping.
    assert max(r["max_norm"] for r in health.history) > max(limit for _, limit in limited)
    assert all(n <= limit * (1 + 1e-4) for n, limit in limited)


def test_agc_bounds_every_units_gradient_to_weight_ratio(tmp_path) -> None:
    clip = GradientClipping(method="agc", agc_clip=0.02)
    _, probe = exploding_rnn_fit(tmp_path, clip, steps=4)
    assert max(probe.unit_ratios) <= 0.02 * (1 + 1e-4)


def test_skip_spikes_leaves_weights_and_optimizer_state_unchanged(tmp_path) -> None:
    seed_everything(0)
    model = TinyMLP(momentum=0.9, lr=1e-3, loss_scale_at={6: 1e4})
    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            optimizer = trainer.optimizers[0]
            snapshots[trainer.global_step] = (
                [p.detach().clone() for p in pl_module.parameters()],
                [optimizer.state[p]["momentum_buffer"].clone() for p in pl_module.parameters() if p in optimizer.state],
            )

    clipper = GradientClipping(method="norm", max_norm=100.0, skip_spikes=10.0)
    with pytest.warns(UserWarning, match="dropped step 6"):
        quiet_trainer(tmp_path, max_steps=8, callbacks=[clipper, Snapshot()]).fit(model)
    before, after = snapshots[6], snapshots[7]
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert clipper._states[0].skipped == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "clamp"}, "method must be"), ({"percentile": 0}, "percentile"), ({"skip_spikes": 0.5}, "skip_spikes")],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientClipping(**kwargs)


def test_manual_optimization_with_two_optimizers_clips_each(tmp_path) -> None:
    from tests.callbacks.test_gradient_health import TwoOptimizers

    seed_everything(0)
    model = TwoOptimizers()
    model.loss_scale_at = {}
    seen: list[tuple[int, float]] = []

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            seen.append((id(optimizer), torch.sqrt(sum(g.square().sum() for g in grads)).item()))

    clipper = GradientClipping(method="norm", max_norm=1e-3)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[clipper, Probe()]).fit(model)
    assert set(clipper._states) == {0, 1} and len({optimizer for optimizer, _ in seen}) == 2
    assert all(norm <= 1e-3 * (1 + 1e-4) for _, norm in seen)
