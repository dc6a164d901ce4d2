from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F

from stabilize.callbacks import SharpnessMonitor
from stabilize.callbacks.sharpness_monitor import _detached
from stabilize.errors import ConfigurationError
from stabilize.health.sharpness import adam_preconditioner, sgd_critical_step, stability_limit, top_eigenvalue
from tests.callbacks.helpers import TinyMLP
from tests.helpers.trainer import quiet_trainer


def test_a_quadratic_gives_its_largest_eigenvalue() -> None:
    # 0.5 x^T A x with eigenvalues 10, 3, 1, 0.5: the Hessian is A.
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    matrix = q @ torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ q.T
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    found = top_eigenvalue(lambda: 0.5 * x @ matrix @ x, [x], iterations=200, tolerance=1e-10)
    # Four dimensions: the Lanczos basis spans the space in at most four products, the value then exact to ~1e-12.
    assert found.converged and found.value == pytest.approx(10.0, rel=1e-9)
    assert abs(float(found.vector[0] @ q[:, 0])) == pytest.approx(1.0, rel=1e-6)
    warm = top_eigenvalue(lambda: 0.5 * x @ matrix @ x, [x], iterations=200, tolerance=1e-10, start=found.vector)
    assert warm.iterations <= 2  # started at the eigenvector


def test_lanczos_needs_few_products_where_power_iteration_crawls() -> None:
    # 0.5 x^T A x in 60 dimensions, top eigenvalues 10 and 9.8: power iteration gains a factor 0.98 per product,
    # Lanczos builds the Krylov space and separates them within a couple of dozen products.
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=generator))
    spectrum = torch.cat([torch.tensor([10.0, 9.8], dtype=torch.float64), 5 * torch.rand(58, generator=generator)])
    matrix = q @ torch.diag(spectrum.to(torch.float64)) @ q.T
    x = torch.randn(60, dtype=torch.float64, requires_grad=True)

    def measure(method: str, iterations: int):
        start = [torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
        quadratic = lambda: 0.5 * x @ matrix @ x  # noqa: E731
        return top_eigenvalue(quadratic, [x], iterations, tolerance=1e-10, start=start, method=method)

    lanczos, power = measure("lanczos", 40), measure("power", 40)
    # float64 throughout: Lanczos's Ritz value reaches the top eigenvalue to ~1e-12 once it converged.
    assert lanczos.converged and lanczos.iterations <= 30 and lanczos.value == pytest.approx(10.0, rel=1e-9)
    assert abs(float(lanczos.vector[0] @ q[:, 0])) == pytest.approx(1.0, rel=1e-6)
    # Power iteration after as many products is still far off (its Rayleigh quotient approaches from below).
    assert not power.converged and power.value < 10.0 - 1e-3
    with pytest.raises(ValueError, match="method"):
        measure("arnoldi", 5)


def dense_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean squared error's dense Hessian over ``net``'s flattened parameters (a Linear-Tanh-Linear net)."""
    shapes = [p.shape for p in net.parameters()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for shape in shapes:
            pieces.append(flat[start : start + math.prod(shape)].view(shape))
            start += math.prod(shape)
        w1, b1, w2, b2 = pieces
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    return torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().flatten() for p in net.parameters()]))


def small_network() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tanh MLP on random regression data, float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return net, torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)


def test_a_network_matches_the_dense_hessian() -> None:
    net, x, y = small_network()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(net, x, y))
    largest = eigenvalues[eigenvalues.abs().argmax()].item()
    found = top_eigenvalue(lambda: ((net(x) - y) ** 2).mean(), list(net.parameters()), iterations=500, tolerance=1e-9)
    # The two largest eigenvalues are well apart here, so power iteration converges; float64 throughout.
    assert found.value == pytest.approx(largest, rel=1e-5)


def test_the_preconditioned_sharpness_matches_the_dense_preconditioned_hessian() -> None:
    net, x, y = small_network()
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(5):  # a second-moment state that differs from parameter to parameter
        optimizer.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        optimizer.step()
    hessian = dense_hessian(net, x, y)
    preconditioner = adam_preconditioner(optimizer, params)
    assert preconditioner is not None
    # P = sqrt(v / (1 - beta2^t)) + eps from Adam's own state, by hand:
    state = optimizer.state[params[0]]
    by_hand = (state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + 1e-8
    torch.testing.assert_close(preconditioner[0], by_hand)
    scale = torch.cat([p.flatten() for p in preconditioner]).rsqrt()
    eigenvalues = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])  # P^-1/2 H P^-1/2
    largest = eigenvalues[eigenvalues.abs().argmax()].item()
    found = top_eigenvalue(
        lambda: ((net(x) - y) ** 2).mean(), params, iterations=2000, tolerance=1e-10, preconditioner=preconditioner
    )
    # Power iteration converges at the ratio of the two largest eigenvalues; to 1e-10 relative change the estimate is
    # within ~1e-6 of the dense value here (float64), well inside the 1e-3.
    assert found.converged and found.value == pytest.approx(largest, rel=1e-5)
    # P^-1 H has the eigenvalues of P^-1/2 H P^-1/2 (similar matrices).
    direct = torch.linalg.eigvals(torch.diag(scale.square()) @ hessian).real
    assert direct[direct.abs().argmax()].item() == pytest.approx(largest, rel=1e-8)


def test_stability_limits() -> None:
    param = [nn.Parameter(torch.zeros(1))]
    assert stability_limit(torch.optim.SGD(param, lr=0.1)) == pytest.approx(20.0)
    assert stability_limit(torch.optim.SGD(param, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    # Adam's limit on the preconditioned sharpness: (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr at beta1 = 0.9.
    assert stability_limit(torch.optim.Adam(param, lr=0.1)) == pytest.approx(380.0)
    assert stability_limit(torch.optim.AdamW(param, lr=0.01, betas=(0.5, 0.99))) == pytest.approx(600.0)
    assert stability_limit(torch.optim.RMSprop(param, lr=0.1)) is None
    assert stability_limit(torch.optim.SGD(param, lr=0.0)) is None
    assert adam_preconditioner(torch.optim.Adam(param, lr=0.1), param) is None  # no state before the first step


def test_the_monitor_logs_every_n_steps_and_explains(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(every_n_steps=3, iterations=30)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=7, callbacks=[monitor], logger=logger)
    model = TinyMLP(lr=0.1, momentum=0.9)
    trainer.fit(model)
    assert [step for step, _, _ in monitor.history] == [0, 3, 6]
    assert all(limit == pytest.approx(38.0) and value > 0 for _, value, limit in monitor.history)
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "sharpness/max_eigenvalue" in text and "sharpness/ratio" in text
    assert "against the stability limit 38" in monitor.diagnosis()
    assert model.training  # back in training mode after each measurement


class AdamMLP(TinyMLP):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def test_under_adam_the_monitor_measures_the_preconditioned_sharpness(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(every_n_steps=2, iterations=30)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=5, callbacks=[monitor], logger=logger)
    trainer.fit(AdamMLP(lr=0.01))
    assert monitor.preconditioned and [step for step, _, _ in monitor.history] == [0, 2, 4]
    assert all(limit == pytest.approx(3800.0) for _, _, limit in monitor.history)
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "sharpness/preconditioned" in text and "sharpness/max_eigenvalue" not in text
    assert monitor.diagnosis().startswith("Preconditioned sharpness (Adam's P^-1 H)")


def test_spikes_are_told_apart_by_the_sharpness_before_them() -> None:
    monitor = SharpnessMonitor(every_n_steps=10, verbose=False)
    monitor.history = [(0, 5.0, 20.0), (10, 19.0, 20.0), (20, 12.0, 20.0), (30, 21.0, 20.0)]
    assert monitor.spikes_at_the_limit([3, 12, 19, 25, 31, 40]) == ([12, 19, 31, 40], [3, 25])
    text = monitor.diagnosis([3, 12, 25])
    assert "Gradient spikes at steps 12 came while the sharpness was at the limit" in text
    assert "those at steps 3, 25 did not." in text
    assert monitor.diagnosis([3, 25]).endswith("none came while the sharpness was at the limit.")
    assert "\n" not in monitor.diagnosis([])


def test_at_fit_end_the_spikes_come_from_the_health_callback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch import seed_everything

    from stabilize.callbacks import GradientHealthCallback

    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=4, warmup_steps=3, verbose=False)
    monitor = SharpnessMonitor(every_n_steps=2, iterations=10)
    # The loss scaled by 1e6 at step 5 plants one gradient spike there (as in the health callback's tests); at
    # LR 1e-9 the limit 2e9 is far above any sharpness, so the spike did not come at the limit.
    with caplog.at_level(logging.INFO):
        quiet_trainer(tmp_path, max_steps=8, callbacks=[health, monitor]).fit(TinyMLP(lr=1e-9, loss_scale_at={5: 1e6}))
    assert health.spike_steps() == [5]
    assert "Gradient spikes at steps 5: none came while the sharpness was at the limit." in caplog.text


def test_the_measurement_batch_can_be_a_few_examples(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(every_n_steps=2, iterations=5, examples=3, verbose=False)
    quiet_trainer(tmp_path, max_steps=3, callbacks=[monitor]).fit(TinyMLP(batch_size=8))
    x, y = monitor._batch
    assert x.shape[0] == 3 and y.shape[0] == 3 and len(monitor.history) == 2
    assert SharpnessMonitor().examples is None  # by default the whole batch: smaller samples read high
    kept = _detached({"x": torch.zeros(100, 2), "y": torch.zeros(100), "n": 5}, 64)
    assert kept["x"].shape == (64, 2) and kept["y"].shape == (64,) and kept["n"] == 5
    assert _detached(torch.zeros(10, 2), 64).shape == (10, 2)
    with pytest.raises(ConfigurationError, match="examples"):
        SharpnessMonitor(examples=0)


def test_a_manually_optimized_module_needs_a_sharpness_loss(tmp_path: Path, tiny_cifar: Path) -> None:
    from stabilize.datamodules import CIFAR10DataModule
    from stabilize.models import DCGAN

    data = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=20, normalize=False, augment=False)
    with pytest.raises(ConfigurationError, match="DCGAN optimizes manually"):
        quiet_trainer(tmp_path, max_steps=2, callbacks=[SharpnessMonitor()]).fit(
            DCGAN(latent_dim=8, ngf=4, ndf=4), data
        )

    class MeasuredGAN(DCGAN):
        def sharpness_loss(self, batch: Any) -> torch.Tensor:
            real = self._real_images(batch)
            return torch.nn.functional.softplus(-self.discriminator(real)).mean()  # the discriminator's real-image loss

    monitor = SharpnessMonitor(every_n_steps=2, iterations=5, verbose=False)
    model = MeasuredGAN(latent_dim=8, ngf=4, ndf=4)
    before = [p.detach().clone() for p in model.parameters()]
    quiet_trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(model, data)
    # Two batches, each a discriminator and a generator step (global steps 0-1, 2-3): measured at the first batch
    # end in each block of 2 steps, and no optimizer step came from a measurement (4 in all, as without it).
    assert [step for step, _, _ in monitor.history] == [1, 3] and model.trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_tied_weights_are_one_parameter_in_the_hessian() -> None:
    # A tied autoencoder: the same matrix encodes (W x) and decodes (W^T h); module.parameters() yields it once, and the
    # sharpness is that of the loss as a function of the one matrix, both uses included.
    torch.manual_seed(0)
    weight = nn.Parameter(0.5 * torch.randn(3, 5, dtype=torch.float64))
    x = torch.randn(32, 5, dtype=torch.float64)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return ((torch.tanh(x @ w.T) @ w - x) ** 2).mean()

    hessian = torch.autograd.functional.hessian(lambda flat: loss_of(flat.view(3, 5)), weight.detach().flatten())
    eigenvalues = torch.linalg.eigvalsh(hessian)
    largest = eigenvalues[eigenvalues.abs().argmax()].item()
    found = top_eigenvalue(lambda: loss_of(weight), [weight], iterations=3000, tolerance=1e-11)
    # float64 throughout; converged to a relative change of 1e-11, the estimate is within ~1e-8 of the dense value.
    assert found.converged and found.value == pytest.approx(largest, rel=1e-6)


def test_a_batchnorm_cnn_in_eval_mode_matches_its_dense_hessian() -> None:
    # The monitor measures in eval mode: BatchNorm normalizes with its running statistics, a fixed affine map, so the
    # loss is a function of the parameters alone and its Hessian is well defined (in train mode it would also depend on
    # the batch's statistics).
    from torch.func import functional_call

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 1)
    ).double()
    with torch.no_grad():  # running statistics away from their initial values
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(
            zip(names, (piece.view(shape) for piece, shape in zip(flat.split([math.prod(s) for s in shapes]), shapes)))
        )
        return ((functional_call(net, pieces, (x,)) - y) ** 2).mean()

    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    largest = eigenvalues[eigenvalues.abs().argmax()].item()
    found = top_eigenvalue(lambda: ((net(x) - y) ** 2).mean(), list(net.parameters()), iterations=3000, tolerance=1e-11)
    assert found.converged and found.value == pytest.approx(largest, rel=1e-6)


class AutocastRecorder(TinyMLP):
    """Notes, for every call of its training_step, whether CPU autocast was on."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.autocast_calls: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.autocast_calls.append(torch.is_autocast_enabled("cpu"))
        return super().training_step(batch, batch_idx)


def test_under_amp_the_monitor_measures_in_full_precision(tmp_path: Path) -> None:
    monitor = SharpnessMonitor(every_n_steps=1, iterations=500, tolerance=1e-7, verbose=False)
    model = AutocastRecorder()
    quiet_trainer(tmp_path, max_steps=1, callbacks=[monitor], precision="bf16-mixed").fit(model)
    # The Trainer's step ran under bf16 autocast, the monitor's call (one loss; its Hessian-vector products
    # differentiate that graph again) did not.
    assert model.autocast_calls == [True, False]
    # One step, one measurement after it: the weights measured are the final ones. Recomputed in float32 with the
    # same convergence: the two differ only by where each power iteration stopped (relative change 1e-7), far
    # below bf16's ~4e-3 rounding, which a measurement under autocast would show.
    model.eval()
    x, y = monitor._batch
    again = top_eigenvalue(
        lambda: torch.nn.functional.cross_entropy(model(x), y),
        list(model.parameters()),
        iterations=500,
        tolerance=1e-7,
    )
    assert monitor.history[0][1] == pytest.approx(again.value, rel=1e-4)


DDP_SCRIPT = """
import json, sys
import torch
from lightning.pytorch import Trainer, seed_everything
from stabilize.callbacks import SharpnessMonitor
from tests.callbacks.helpers import TinyMLP

out = sys.argv[1]
seed_everything(0)
monitor = SharpnessMonitor(**SETTINGS)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                  callbacks=[monitor])
trainer.fit(TinyMLP(lr=0.1, momentum=0.9))  # every rank loads the same batches (no distributed sampler)
json.dump(monitor.history, open(f"{out}_rank{trainer.global_rank}.json", "w"))
"""
DDP_SETTINGS = {"every_n_steps": 2, "iterations": 500, "tolerance": 1e-7, "verbose": False}


def test_under_ddp_every_rank_measures_what_one_process_measures(tmp_path: Path) -> None:
    from lightning.pytorch import seed_everything

    from tests.helpers.commands import python_script

    script = tmp_path / "ddp_sharpness.py"
    script.write_text(DDP_SCRIPT.replace("**SETTINGS", f"**{DDP_SETTINGS!r}"))
    python_script(script, str(tmp_path / "ddp"), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"ddp_rank{rank}.json").read_text()) for rank in (0, 1)]
    seed_everything(0)
    one = SharpnessMonitor(**DDP_SETTINGS)  # the same run in this process, on one device
    quiet_trainer(tmp_path, max_steps=5, callbacks=[one], use_distributed_sampler=False).fit(
        TinyMLP(lr=0.1, momentum=0.9)
    )
    single = [list(item) for item in one.history]
    # With the same batches on both ranks DDP's averaged gradient is each rank's own, so the weights, the fixed
    # batch and hence the sharpness are the single process's; converged to a relative change of 1e-7, the values
    # agree to far better than 1e-4.
    assert [step for step, _, _ in single] == [0, 2, 4]
    for history in ranks:
        assert [step for step, _, _ in history] == [0, 2, 4]
        for (_, value, limit), (_, one_value, one_limit) in zip(history, single):
            assert value == pytest.approx(one_value, rel=1e-4) and limit == pytest.approx(one_limit)


def bisected_limit(lr: float, **settings: float | bool) -> float:
    """The smallest curvature ``lambda`` of a quadratic on which ``torch.optim.SGD(lr, **settings)`` diverges, found
    on a grid of 4,001 curvatures within 5% of the formula's, run at once (one parameter per curvature, gradient
    ``lambda * w``; weight decay adds its own ``wd * w``)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, **settings)  # type: ignore[arg-type]
    guess = stability_limit(optimizer)
    assert guess is not None
    curvatures = torch.linspace(0.95 * guess, 1.05 * guess, 4_001, dtype=torch.float64)
    weight = torch.nn.Parameter(torch.ones_like(curvatures))
    optimizer = torch.optim.SGD([weight], lr=lr, **settings)  # type: ignore[arg-type]
    for _ in range(4000):
        weight.grad = curvatures * weight.detach()
        optimizer.step()
    # Near the limit an eigenvalue's modulus moves by ~(x - x*) (1 - dampening) / 4 or more per step (x = lr *
    # lambda): 4000 steps grow a weight 1e-3 (relative) above the limit by e^1 or more and shrink one below it, on a
    # grid 2.5e-5 (relative) fine.
    diverged = weight.detach().abs() > 1.0
    return float(curvatures[diverged.nonzero()[0, 0]])


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.5},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.3, "nesterov": True},
        {"momentum": 0.9, "dampening": 0.9},
        {"momentum": 0.9, "dampening": 0.5},
        {"dampening": 0.5},
        {"momentum": 0.9, "weight_decay": 0.5},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ],
)
def test_every_sgd_setting_limit_is_the_bisected_critical_value(settings: dict) -> None:
    lr = 0.1
    limit = stability_limit(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, **settings))
    assert limit is not None
    # Critical lr * lambda within 1e-3 (relative, where it is above 1: 38 with dampening 0.9) of the one bisected on
    # torch's own SGD.
    assert lr * limit == pytest.approx(lr * bisected_limit(lr, **settings), rel=1e-3, abs=1e-3)


def test_nesterov_and_dampening_limits_and_a_refusal() -> None:
    param = [torch.nn.Parameter(torch.zeros(1))]
    assert sgd_critical_step(0.9, nesterov=True) == pytest.approx(3.8 / 2.8)  # 1.357, not heavy ball's 3.8
    assert stability_limit(torch.optim.SGD(param, lr=0.1, momentum=0.9, dampening=0.9)) == pytest.approx(380.0)
    with pytest.raises(ValueError, match="maximize=True ascends"):
        stability_limit(torch.optim.SGD(param, lr=0.1, maximize=True))


def test_at_initialisation_the_monitor_measures_before_the_first_update(tmp_path: Path) -> None:
    seed_everything(0)
    model = TinyMLP(lr=0.1, momentum=0.9)
    reference = copy.deepcopy(model).eval()  # the monitor measures in eval mode (BatchNorm's running statistics)
    x, y = next(iter(model.train_dataloader()))
    params = list(reference.parameters())
    expected = top_eigenvalue(lambda: F.cross_entropy(reference(x), y), params, 30, 1e-3).value
    monitor = SharpnessMonitor(every_n_steps=3, iterations=30, tolerance=1e-3, at_initialisation=True, verbose=False)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[monitor]).fit(model)
    # Both estimates are within 0.1% of the same eigenvalue (the Lanczos residual bound): 0.2% apart at most.
    assert monitor.initial_sharpness == pytest.approx(expected, rel=2e-3)
    assert [step for step, _, _ in monitor.history] == [0, 3]  # after the updates of steps 0 and 3
    assert SharpnessMonitor().initial_sharpness is None  # only when asked
