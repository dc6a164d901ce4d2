from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import DCGAN
from stabilize.models.gan_networks import DCGANDiscriminator, DCGANGenerator, generator_loss
from tests.helpers.trainer import quiet_trainer

SMALL = {"latent_dim": 16, "ngf": 8, "ndf": 8, "num_samples": 16}


def gan_data(data_dir: Path, batch_size: int = 20) -> CIFAR10DataModule:
    return CIFAR10DataModule(str(data_dir), val_size=0, batch_size=batch_size, normalize=False, augment=False)


def test_networks_map_noise_to_images_and_images_to_one_logit() -> None:
    generator, discriminator = DCGANGenerator(16, 8), DCGANDiscriminator(8)
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, 3, 32, 32) and images.abs().max() <= 1
    assert discriminator(images).shape == (5,)


def test_fast_dev_run_steps_both_networks_and_the_callback_reads_each(tiny_cifar: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = DCGAN(**SMALL)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    quiet_trainer(tmp_path, fast_dev_run=2, callbacks=[health]).fit(model, gan_data(tiny_cifar))
    changed = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed == {"generator", "discriminator"}
    assert model.last_sample_grid is not None and model.last_sample_grid.shape[0] == 3
    summary = health.summary()
    assert set(summary) == {"generator", "discriminator"}
    assert all(name.startswith("generator.") for name in health.history_of(0)[0]["layers"])
    assert all(name.startswith("discriminator.") for name in health.history_of(1)[0]["layers"])
    diagnosis = health.diagnosis(model)
    assert "Gradient health of the generator" in diagnosis and "Gradient health of the discriminator" in diagnosis


def test_sample_grid_and_losses_reach_tensorboard(tiny_cifar: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = DCGAN(**SMALL, sample_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="gan")
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=4, logger=logger, log_every_n_steps=1, callbacks=[health]
    ).fit(model, gan_data(tiny_cifar))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert len(events.Images("gan/samples")) == 2  # generator steps 1 and 3
    scalars = set(events.Tags()["scalars"])
    assert {"gan/d_loss_step", "gan/g_loss_step", "gan/d_real", "gan/d_fake"} <= scalars
    assert {"grad_health/generator/global_norm", "grad_health/discriminator/global_norm"} <= scalars
    assert "grad_norm/generator/generator.0" in scalars and "grad_norm/discriminator/discriminator.0" in scalars


def test_checkpoint_round_trip_restores_both_optimizers_and_the_samples(tiny_cifar: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = DCGAN(**SMALL)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    data = gan_data(tiny_cifar)
    quiet_trainer(tmp_path, max_steps=6, callbacks=[saver], enable_checkpointing=True).fit(model, data)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert len(checkpoint["optimizer_states"]) == 2

    reloaded = DCGAN.load_from_checkpoint(tmp_path / "last.ckpt")
    torch.testing.assert_close(reloaded.sample(), model.sample(), rtol=0, atol=0)

    restored = []

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            restored.extend(copy.deepcopy(optimizer.state_dict()) for optimizer in trainer.optimizers)

    quiet_trainer(tmp_path, max_steps=8, callbacks=[Spy()]).fit(DCGAN(**SMALL), data, ckpt_path=tmp_path / "last.ckpt")
    for saved, loaded in zip(checkpoint["optimizer_states"], restored):
        first = next(iter(saved["state"]))
        assert loaded["state"][first]["step"] == saved["state"][first]["step"] == 3  # 6 steps, 3 per optimizer
        torch.testing.assert_close(loaded["state"][first]["exp_avg"], saved["state"][first]["exp_avg"])


def test_spectral_norm_keeps_each_discriminator_layer_near_one(tiny_cifar: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = DCGAN(**SMALL, spectral_norm=True, discriminator_batch_norm=False, loss="hinge", betas=(0.0, 0.9))
    quiet_trainer(tmp_path, max_steps=30).fit(model, gan_data(tiny_cifar))
    convs = [m for m in model.discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(hasattr(m, "parametrizations") for m in convs)
    with torch.no_grad():
        sigmas = [torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in convs]
    assert sigmas == pytest.approx([1.0] * 4, abs=0.05), sigmas


class WinningDiscriminator(DCGAN):
    """A discriminator that rejects every image with a logit of about -30: it wins outright."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with torch.no_grad():
            self.discriminator[-2].bias.fill_(-30.0)


@pytest.mark.parametrize(("loss", "vanishes"), [("minimax", True), ("non_saturating", False)])
def test_minimax_loss_under_a_winning_discriminator_vanishes_the_generator_gradient(
    tiny_cifar: Path, tmp_path: Path, loss: str, vanishes: bool
) -> None:
    seed_everything(0)
    model = WinningDiscriminator(**SMALL, loss=loss)
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    quiet_trainer(tmp_path, max_steps=4, callbacks=[health]).fit(model, gan_data(tiny_cifar))
    generator = health.summary()["generator"]
    assert bool(generator["vanishing_layers_now"]) is vanishes
    assert len(generator["vanishing_layers_now"]) in ((0,) if not vanishes else (generator["num_layers"],))
    if vanishes:
        assert "the discriminator wins" in health.diagnosis(
            model
        ) and "--model.loss non_saturating" in health.diagnosis(model)


def test_minimax_gradient_is_sigmoid_of_the_logit() -> None:
    logits = torch.tensor([-30.0, 0.0, 30.0], requires_grad=True)
    (minimax,) = torch.autograd.grad(generator_loss("minimax", logits), logits)
    (non_saturating,) = torch.autograd.grad(generator_loss("non_saturating", logits), logits)
    torch.testing.assert_close(minimax, -torch.sigmoid(logits.detach()) / 3)
    torch.testing.assert_close(non_saturating, -torch.sigmoid(-logits.detach()) / 3)


def test_normalized_images_are_refused_with_the_fix(tiny_cifar: Path, tmp_path: Path) -> None:
    data = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=20)  # normalize=True: values beyond [0, 1]
    with pytest.raises(ValueError, match="normalize false"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(DCGAN(**SMALL), data)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "wasserstein"}, "loss must be one of"),
        ({"n_critic": 0}, "n_critic must be at least 1"),
        ({"betas": (0.5, 1.0)}, "betas"),
    ],
)
def test_arguments_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DCGAN(**kwargs)


def test_trainer_clipping_is_refused_and_the_module_clips(tiny_cifar: Path, tmp_path: Path) -> None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="manual optimization"):
        quiet_trainer(tmp_path, fast_dev_run=1, gradient_clip_val=1.0).fit(DCGAN(**SMALL), gan_data(tiny_cifar))
    seen = []

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())

    model = DCGAN(**SMALL, gradient_clip_val=1e-3)
    quiet_trainer(tmp_path, fast_dev_run=2, callbacks=[Spy()]).fit(model, gan_data(tiny_cifar))
    assert seen and max(seen) <= 1e-3 * 1.0001


@pytest.mark.parametrize("kwargs", [{"loss": "minimax"}, {"loss": "hinge", "spectral_norm": True}])
def test_every_hint_ends_in_advice_that_fits_the_configuration(kwargs: dict) -> None:
    hints = DCGAN(**SMALL, **kwargs).gradient_health_hints()
    assert all(not text.endswith(": ") for text in hints.values())
    offered = " ".join(hints.values())
    assert ("--model.spectral_norm true" in offered) is not kwargs.get("spectral_norm", False)
    assert ("--model.loss non_saturating" in offered) is (kwargs["loss"] == "minimax")
