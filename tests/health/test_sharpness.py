from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from stabilize.callbacks import SharpnessMonitor
from stabilize.health.sharpness import stability_limit, top_eigenvalue
from tests.callbacks.helpers import TinyMLP
from tests.helpers.trainer import quiet_trainer


def test_a_quadratic_gives_its_largest_eigenvalue() -> None:
    # 0.5 x^T A x with eigenvalues 10, 3, 1, 0.5: the Hessian is A.
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    matrix = q @ torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ q.T
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    found = top_eigenvalue(lambda: 0.5 * x @ matrix @ x, [x], iterations=200, tolerance=1e-10)
    # Power iteration converges as (3/10)^k: to 1e-10 in ~20 iterations; the value then is exact to ~1e-12.
    assert found.converged and found.value == pytest.approx(10.0, rel=1e-9)
    assert abs(float(found.vector[0] @ q[:, 0])) == pytest.approx(1.0, rel=1e-6)
    warm = top_eigenvalue(lambda: 0.5 * x @ matrix @ x, [x], iterations=200, tolerance=1e-10, start=found.vector)
    assert warm.iterations <= 2  # started at the eigenvector


def test_a_network_matches_the_dense_hessian() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for shape in shapes:
            pieces.append(flat[start : start + math.prod(shape)].view(shape))
            start += math.prod(shape)
        w1, b1, w2, b2 = pieces
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()

    flat = torch.cat([p.detach().flatten() for p in params])
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    largest = eigenvalues[eigenvalues.abs().argmax()].item()
    found = top_eigenvalue(lambda: ((net(x) - y) ** 2).mean(), params, iterations=500, tolerance=1e-9)
    # The two largest eigenvalues are well apart here, so power iteration converges; float64 throughout.
    assert found.value == pytest.approx(largest, rel=1e-5)


def test_stability_limits() -> None:
    param = [nn.Parameter(torch.zeros(1))]
    assert stability_limit(torch.optim.SGD(param, lr=0.1)) == pytest.approx(20.0)
    assert stability_limit(torch.optim.SGD(param, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert stability_limit(torch.optim.Adam(param, lr=0.1)) is None


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
