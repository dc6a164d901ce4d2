"""log_train: the same keys and values as Lightning's own per-step ``self.log(on_step=True, on_epoch=True)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from stabilize.models import DCGAN, RecurrentNet, ResNet, TransformerLM
from stabilize.models.epoch_means import DeviceLoggedModule, EpochMeans
from tests.helpers.trainer import quiet_trainer


def test_epoch_means_are_weighted_means_and_reset() -> None:
    means = EpochMeans()
    means.add("loss", torch.tensor(2.0), weight=3)
    means.add("loss", torch.tensor(4.0), weight=1)
    means.add("acc", torch.tensor(0.5, dtype=torch.bfloat16), weight=2)
    result = means.means()
    assert result["loss"].item() == pytest.approx((2 * 3 + 4) / 4)
    assert result["acc"].dtype == torch.float32 and result["acc"].item() == 0.5
    assert means.sums()["loss"][1] == 4
    means.reset()
    assert len(means) == 0 and means.means() == {}


class RecordingLogger(Logger):
    """Every ``log_metrics`` call, as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


class EpochEndMetrics(Callback):
    """What an ordinary (non-monitoring) callback sees in ``callback_metrics`` at each epoch's end."""

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.seen: list[dict[str, float]] = []
        self.stop_at_step = stop_at_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.stop_at_step is not None and trainer.global_step >= self.stop_at_step:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train")})


def with_lightning_logging(cls: type[DeviceLoggedModule]) -> type[DeviceLoggedModule]:
    """``cls`` logging its training values the way Lightning documents: ``self.log`` at every step."""

    class PerStepLog(cls):  # type: ignore[misc,valid-type]
        def log_train(
            self, name: str, value: Tensor, batch_size: int, prog_bar: bool = False, epoch: bool = True
        ) -> None:
            self.log(name, value.detach(), on_step=True, on_epoch=epoch, batch_size=batch_size)

    return PerStepLog


def image_case() -> tuple[Any, DataLoader]:
    x, y = torch.randn(60, 3, 32, 32), torch.randint(0, 10, (60,))
    return lambda cls: cls(depth=8, lr=0.01), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def recurrent_case() -> tuple[Any, DataLoader]:
    x, y = torch.randn(60, 6, 3), torch.randint(0, 4, (60,))
    build = lambda cls: cls(input_size=3, output_size=4, output="classification", hidden_size=8)  # noqa: E731
    return build, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def transformer_case() -> tuple[Any, DataLoader]:
    tokens = torch.randint(0, 12, (60, 9))
    build = lambda cls: cls(vocab_size=12, context=8, depth=1, width=16, heads=2)  # noqa: E731
    return build, DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8, shuffle=True)


def gan_case() -> tuple[Any, DataLoader]:
    images = torch.rand(60, 3, 32, 32)
    build = lambda cls: cls(latent_dim=8, ngf=8, ndf=8, n_critic=3, sample_every_n_steps=0)  # noqa: E731
    return build, DataLoader(TensorDataset(images), batch_size=8, shuffle=True)


CASES = {"image": (ResNet, image_case), "recurrent": (RecurrentNet, recurrent_case)}
CASES["transformer"] = (TransformerLM, transformer_case)
#: Two optimizers, manual optimization, step-only values and a generator loss logged every third batch only.
CASES["gan"] = (DCGAN, gan_case)

#: Two whole epochs; max_steps mid-epoch; a stop requested mid-epoch by a callback; gradient accumulation.
RUNS = {
    "epochs": {"max_epochs": 2},
    "max_steps": {"max_steps": 11},
    "stop": {"max_epochs": 2, "stop_at_step": 5},
    "accumulate": {"max_epochs": 2, "accumulate_grad_batches": 2},
}


def fit(cls: type[DeviceLoggedModule], case: Any, run: dict[str, Any], tmp_path: Path) -> tuple[Any, ...]:
    options = dict(run)
    seen = EpochEndMetrics(options.pop("stop_at_step", None))
    logger = RecordingLogger()
    seed_everything(0, verbose=False)
    build, loader = case()
    trainer = quiet_trainer(tmp_path, logger=logger, log_every_n_steps=3, callbacks=[seen], **options)
    trainer.fit(build(cls), loader)
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train")}
    return logger.rows, seen.seen, final


#: Manual optimization (the GAN) accumulates gradients itself: Lightning refuses accumulate_grad_batches there.
PAIRS = [(family, run) for family in CASES for run in RUNS if (family, run) != ("gan", "accumulate")]


@pytest.mark.parametrize(("family", "run"), PAIRS)
def test_log_train_logs_what_per_step_self_log_does(family: str, run: str, tmp_path: Path) -> None:
    """Loggers, callbacks at epoch end and the final ``callback_metrics`` get the same keys at the same steps, with
    the same values: step values bit for bit, epoch means to float32 rounding (a sum of at most 16 products
    accumulated in another order: relative error below 16 x 6e-8, checked at 1e-5)."""
    cls, case = CASES[family]
    ours = fit(cls, case, RUNS[run], tmp_path / "ours")
    lightning = fit(with_lightning_logging(cls), case, RUNS[run], tmp_path / "lightning")
    ours_rows, lightning_rows = ours[0], lightning[0]
    assert [(step, sorted(m)) for step, m in ours_rows] == [(step, sorted(m)) for step, m in lightning_rows]
    assert any(any(k.endswith("_epoch") for k in m) for _, m in ours_rows)
    for (_, mine), (_, theirs) in zip(ours_rows, lightning_rows):
        assert mine == pytest.approx(theirs, rel=1e-5)
    ours_seen, lightning_seen = [*ours[1], ours[2]], [*lightning[1], lightning[2]]
    assert [sorted(m) for m in ours_seen] == [sorted(m) for m in lightning_seen]
    for mine, theirs in zip(ours_seen, lightning_seen):
        assert mine == pytest.approx(theirs, rel=1e-5)
