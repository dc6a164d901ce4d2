from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from torch import nn

from stabilize.datamodules import CIFAR10DataModule
from stabilize.models import FastCNN
from stabilize.models.base import triangular
from tests.helpers.data import SyntheticImages, prototype_images
from tests.helpers.trainer import quiet_trainer

SMALL = {"widths": (8, 16, 16)}


def test_network_shape_frozen_parts_and_scaled_logits() -> None:
    model = FastCNN()
    convs = [m for m in model.network.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 64, 64, 256, 256, 256, 256]
    assert not convs[0].weight.requires_grad and convs[0].bias.requires_grad  # whitening: only its bias trains
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    head = [m for m in model.network.modules() if isinstance(m, nn.Linear)]
    assert head[0].bias is None and model.network[-1].factor == pytest.approx(1 / 9)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_whitening_is_initialised_from_the_first_training_batch(tmp_path: Path) -> None:
    seed_everything(0)
    model = FastCNN(**SMALL, scheduler="constant", lr=0.01)
    assert not bool(model.whitening_ready)
    data = SyntheticImages(num=64, batch_size=64)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, data)
    assert bool(model.whitening_ready)
    layer = model.network[0]
    # The first 12 filters whiten 2x2 patches: their outputs on training patches are decorrelated with unit variance.
    patches = F.unfold(data.images, kernel_size=2).transpose(1, 2).reshape(-1, 12)
    outputs = (patches - patches.mean(0)) @ layer.weight[:12].reshape(12, -1).T
    covariance = outputs.T @ outputs / len(outputs)
    torch.testing.assert_close(covariance, torch.eye(12), atol=2e-2, rtol=0)
    torch.testing.assert_close(layer.weight[12:], -layer.weight[:12])


def test_bias_learning_rate_multiplier_and_decoupled_weight_decay() -> None:
    model = FastCNN(**SMALL, lr=0.2, weight_decay=1e-3, bias_lr_multiplier=64.0, scheduler="constant")
    optimizer = model.configure_optimizers()
    weights, biases, _ = optimizer.param_groups
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == norm_biases
    assert biases["lr"] == pytest.approx(0.2 * 64) and weights["lr"] == pytest.approx(0.2)
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)  # none coupled into the gradient
    assert weights["decoupled_weight_decay"] == 1e-3 and biases["decoupled_weight_decay"] == pytest.approx(1e-3 / 64)
    weight = weights["params"][0]
    weight.grad = torch.zeros_like(weight)
    before = weight.detach().clone()
    model.on_before_optimizer_step(optimizer)
    torch.testing.assert_close(weight.detach(), before * (1 - 0.2 * 1e-3))


def test_lookahead_pulls_weights_to_the_slow_copy_and_ends_on_it(tmp_path: Path) -> None:
    seed_everything(0)
    model = FastCNN(**SMALL, lookahead_every=2, lookahead_decay=0.5, scheduler="constant", lr=0.05)
    slow_history = []

    original = model.on_train_batch_end

    def spy(outputs, batch, batch_idx):
        original(outputs, batch, batch_idx)
        if model.trainer.global_step % 2 == 0:
            averaged = model._lookahead_tensors()
            slow_history.append(all(torch.equal(a, b) for a, b in zip(averaged, model._slow_weights)))

    model.on_train_batch_end = spy
    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(model, SyntheticImages(num=64, batch_size=16))
    assert slow_history == [True, True]  # right after each lookahead update the fast weights equal the slow ones
    assert model._slow_weights is None  # handed over at the end of training


def test_flip_test_time_augmentation_is_mirror_invariant() -> None:
    model = FastCNN(**SMALL, tta="flip").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.evaluation_logits(images), model.evaluation_logits(images.flip(-1)))
        assert not torch.allclose(model(images), model(images.flip(-1)))


def test_flip_shift_test_time_augmentation_weights_the_views_as_the_speed_runs() -> None:
    """Half the mirror pair, a quarter each mirror pair of the reflect-padded crops one pixel up-left/down-right."""
    model = FastCNN(**SMALL, tta="flip_shift").eval()
    images = torch.randn(4, 3, 32, 32)
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():

        def mirrored(x: torch.Tensor) -> torch.Tensor:
            return 0.5 * (model(x) + model(x.flip(-1)))

        shifted = 0.5 * (mirrored(padded[..., :32, :32]) + mirrored(padded[..., 2:, 2:]))
        expected = 0.5 * mirrored(images) + 0.5 * shifted
        torch.testing.assert_close(model.evaluation_logits(images), expected, rtol=1e-4, atol=1e-5)


def test_triangular_schedule() -> None:
    multiplier = triangular(total_steps=100, peak_step=20)
    assert multiplier(0) == pytest.approx(0.2)
    assert multiplier(20) == pytest.approx(1.0)
    assert multiplier(100) == pytest.approx(0.07)
    assert multiplier(60) == pytest.approx(1 + (0.07 - 1) * 0.5)


def test_trains_on_synthetic_data_with_every_trick_on(tmp_path: Path) -> None:
    seed_everything(0)
    # Speed-run networks want a high learning rate: with lr=0.05 this run stays below 30%.
    model = FastCNN(
        widths=(16, 32, 32),
        label_smoothing=0.2,
        scheduler="triangular",
        warmup_fraction=0.2,
        lr=1.0,
        optimizer="sgd",
        weight_decay=5e-4,
        channels_last=True,
    )
    # 8 epochs: 96-97% with one or two CPU threads (6 epochs varies from 79% to 91% with the thread count).
    quiet_trainer(tmp_path, max_epochs=8, limit_val_batches=0).fit(model, SyntheticImages())
    images, labels = prototype_images()
    model.eval()
    with torch.no_grad():
        accuracy = (model.evaluation_logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9


def test_fast94_fast_dev_run_on_cpu_with_the_gpu_data_option(tiny_cifar: Path, tmp_path: Path) -> None:
    """configs/fast94.yaml asks for GPU-resident data; without a GPU it falls back with a warning and runs."""
    from stabilize.cli import StabilizeCLI

    config = Path(__file__).resolve().parents[2] / "configs" / "fast94.yaml"
    with pytest.warns(UserWarning, match="no GPU is available"):
        StabilizeCLI(
            args=[
                "fit",
                "--config",
                str(config),
                "--model.widths=[8, 16, 16]",
                "--model.compile=false",
                f"--data.data_dir={tiny_cifar}",
                "--data.batch_size=32",
                "--trainer.accelerator=cpu",
                "--trainer.precision=32-true",
                "--trainer.fast_dev_run=true",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_gpu_resident_loader_yields_batches_without_a_dataloader(tiny_cifar: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    datamodule = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=32, device="cuda")
    datamodule.setup()
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8


def test_lookahead_checkpoints_hold_the_slow_weights_and_resume_keeps_them(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0)
    model = FastCNN(**SMALL, lookahead_every=2, lookahead_decay=0.5, scheduler="constant", lr=0.05)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    data = SyntheticImages(num=64, batch_size=16)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[saver], enable_checkpointing=True).fit(
        model, data
    )
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for key, value in model.state_dict().items():  # the model after fit ended on the slow weights
        torch.testing.assert_close(last["state_dict"][key], value, rtol=0, atol=0)
    averaged = list(model._lookahead_state())  # floating-point parameters and buffers (BatchNorm statistics)
    assert set(last["lookahead_fast_weights"]) == set(averaged) and "network.2.2.running_mean" in averaged

    resumed = FastCNN(**SMALL, lookahead_every=2, lookahead_decay=0.5, scheduler="constant", lr=0.05)
    slow_at_start = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not slow_at_start:  # before the first step after resuming
                slow_at_start.extend(t.clone() for t in pl_module._slow_weights)

    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[Spy()]).fit(
        resumed, data, ckpt_path=tmp_path / "last.ckpt"
    )
    keys = list(resumed._lookahead_state())
    assert len(slow_at_start) == len(keys)
    for key, slow in zip(keys, slow_at_start):
        torch.testing.assert_close(slow, last["state_dict"][key], rtol=0, atol=0)


def test_dirac_init_starts_each_3x3_convolution_as_the_identity_on_its_inputs() -> None:
    model = FastCNN(**SMALL)
    convs = [m for m in model.network.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    for conv in convs:
        x, kept = torch.randn(2, conv.in_channels, 6, 6), min(conv.in_channels, conv.out_channels)
        torch.testing.assert_close(conv(x)[:, :kept], x[:, :kept])
    assert not torch.equal(FastCNN(**SMALL, conv_init="default").network[2][0].weight, convs[0].weight)


def test_whitening_bias_freezes_after_its_epochs_and_filters_come_from_the_datamodule(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    seed_everything(0)
    datamodule = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=50, scale=None, translate=2)
    model = FastCNN(**SMALL, whiten_images=120, whiten_bias_epochs=1, scheduler="constant", lr=0.05)
    bias_by_epoch = []

    class Spy(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            bias_by_epoch.append(pl_module.network[0].bias.detach().clone())

    quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[Spy()]).fit(model, datamodule)
    assert not model.network[0].bias.requires_grad
    assert not torch.equal(bias_by_epoch[0], model.network[0].weight.new_zeros(24))  # trained in epoch 0
    torch.testing.assert_close(bias_by_epoch[1], bias_by_epoch[2], rtol=0, atol=0)  # frozen from epoch 1 on
    # Filters fitted on the first 120 unaugmented training images, not on the first (augmented) batch of 50.
    images = datamodule.transform_images(datamodule.split("train")[0][:120], train=False)
    reference = FastCNN(**SMALL)
    reference.init_whitening(images)
    torch.testing.assert_close(model.network[0].weight, reference.network[0].weight)


def test_lookahead_decay_ramps_up_cubically_to_its_final_value(tmp_path: Path) -> None:
    model = FastCNN(**SMALL, lookahead_every=1, lookahead_decay=0.8, scheduler="constant", lr=0.01)
    quiet_trainer(tmp_path, max_steps=10, limit_val_batches=0).fit(model, SyntheticImages(num=64, batch_size=16))
    assert model.lookahead_decay_at(0) == 0.0
    assert model.lookahead_decay_at(5) == pytest.approx(0.8 * 0.5**3)
    assert model.lookahead_decay_at(10) == pytest.approx(0.8)
    assert FastCNN(**SMALL, lookahead_ramp=0, lookahead_decay=0.8).lookahead_decay_at(3) == 0.8


def test_whitening_is_fitted_in_float32_inside_autocast() -> None:
    images = torch.randn(64, 3, 32, 32)
    plain, mixed = FastCNN(**SMALL), FastCNN(**SMALL)
    plain.init_whitening(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed.init_whitening(images)
    torch.testing.assert_close(mixed.network[0].weight, plain.network[0].weight)
