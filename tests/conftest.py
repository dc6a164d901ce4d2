from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers.cifar import make_tiny_cifar

# Under pytest-xdist each worker gets one core; more threads would only fight over the two cores. The processes the
# tests start (benchmark smoke runs, DDP scripts, the notebook's kernel, the console script) inherit the variable.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only tiny CIFAR-10 copy shared by the whole session (do not modify)."""
    return make_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture
def tiny_cifar_copy(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 copy a test may damage."""
    return make_tiny_cifar(tmp_path / "data")


@pytest.fixture
def real_cifar_dir() -> Path:
    path = os.environ.get("STABILIZE_CIFAR10_DIR")
    if not path:
        pytest.skip("STABILIZE_CIFAR10_DIR is not set; set it to a real CIFAR-10 copy to run this test")
    return Path(path)
