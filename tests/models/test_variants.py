from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from torch import nn

from stabilize.models import BatchNormCNN, DeepPlainCNN, FixupResNet, ImageClassifier, PlainCNN, ResNet
from stabilize.models.blocks import BasicBlock, FixupBasicBlock, PadShortcut
from tests.helpers.data import SyntheticImages, prototype_images
from tests.helpers.trainer import quiet_trainer

# Small but complete configurations of every variant, so the whole matrix runs in seconds on a CPU.
VARIANTS = [
    pytest.param(PlainCNN, {}, id="PlainCNN"),
    pytest.param(DeepPlainCNN, {"depth": 8}, id="DeepPlainCNN"),
    pytest.param(BatchNormCNN, {"depth": 8}, id="BatchNormCNN"),
    pytest.param(ResNet, {"depth": 8}, id="ResNet"),
    pytest.param(FixupResNet, {"depth": 8}, id="FixupResNet"),
]
STABILIZED = {"BatchNormCNN", "ResNet", "FixupResNet"}


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS)
def test_output_shape_and_dtype(cls: type[ImageClassifier], kwargs: dict) -> None:
    model = cls(**kwargs)
    logits = model(torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS)
def test_overfits_256_synthetic_images(cls: type[ImageClassifier], kwargs: dict) -> None:
    seed_everything(0)
    model = cls(optimizer="adam", lr=1e-3, scheduler="constant", weight_decay=0.0, **kwargs)
    images, labels = prototype_images()
    with torch.no_grad():
        loss_before = F.cross_entropy(model(images), labels).item()
    quiet_trainer(max_epochs=8, limit_val_batches=0).fit(model, SyntheticImages())
    model.eval()
    with torch.no_grad():
        logits = model(images)
    loss_after = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert loss_after < 0.5 * loss_before
    if cls.__name__ in STABILIZED:
        assert accuracy > 0.9


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS)
def test_fast_dev_run_and_checkpoint_round_trip(cls: type[ImageClassifier], kwargs: dict, tmp_path: Path) -> None:
    seed_everything(0)
    model = cls(**kwargs)
    trainer = quiet_trainer(fast_dev_run=2, default_root_dir=tmp_path)
    trainer.fit(model, SyntheticImages())
    assert trainer.state.finished
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    restored = cls.load_from_checkpoint(checkpoint)
    assert type(restored) is cls
    assert dict(restored.hparams) == dict(model.hparams)
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize(("depth", "expected"), [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_resnet_parameter_counts_match_the_paper(depth: int, expected: float) -> None:
    count = sum(p.numel() for p in ResNet(depth=depth).parameters())
    # He et al. (2016), Table 6 rounds to two significant digits.
    assert abs(count - expected) / expected < 0.02
    assert count == {20: 269_722, 56: 853_018, 110: 1_727_962}[depth]


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_deep_plain_cnn_depth_counts_weight_layers(depth: int) -> None:
    model = DeepPlainCNN(depth=depth)
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weight_layers) == depth
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())


def test_plain_cnn_is_the_corrected_seed_convnet() -> None:
    model = PlainCNN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 64, (3, 3), (1, 1)),
        (64, 64, (3, 3), (1, 1)),
        (64, 128, (3, 3), (1, 1)),
        (128, 128, (3, 3), (1, 1)),
        (128, 256, (3, 3), (1, 1)),
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(h.in_features, h.out_features) for h in head] == [(256, 10)]
    assert isinstance(list(model.network)[-1], nn.Linear)  # raw logits, no activation after the head


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_batchnorm_cnn_normalizes_after_every_conv(norm: str) -> None:
    model = BatchNormCNN(depth=8, norm=norm)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(convs) == len(norms) == 7
    assert all(c.bias is None for c in convs)  # the norm's shift replaces the bias
    if norm == "layer":
        assert all(n.num_groups == 1 for n in norms)


def test_deep_sigmoid_small_init_vanishes_and_batchnorm_does_not() -> None:
    """The point of the collection: with depth, sigmoid and a naive init the first layer gets almost nothing."""
    images, labels = prototype_images(64)

    def first_to_last_ratio(model: ImageClassifier) -> float:
        model.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return (weights[0].grad.norm() / weights[-1].grad.norm()).item()

    torch.manual_seed(0)
    fragile = first_to_last_ratio(DeepPlainCNN(depth=20, activation="sigmoid", init="small_normal"))
    torch.manual_seed(0)
    normalized = first_to_last_ratio(BatchNormCNN(depth=20, activation="sigmoid", init="small_normal"))
    assert fragile < 1e-6
    assert normalized > 1e-3


@pytest.mark.parametrize(("preact", "shortcut"), [(False, "A"), (False, "B"), (True, "A"), (True, "B")])
def test_resnet_options_build_and_run(preact: bool, shortcut: str) -> None:
    model = ResNet(depth=8, preact=preact, shortcut=shortcut, width=2)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3
    assert all(b.preact is preact for b in blocks)
    downsampling = [b for b in blocks if b.shortcut is not None]
    expected = PadShortcut if shortcut == "A" else nn.Sequential
    assert len(downsampling) == 2
    assert all(isinstance(b.shortcut, expected) for b in downsampling)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert blocks[0].conv1.out_channels == 32  # width multiplier


@pytest.mark.parametrize("preact", [False, True])
def test_zero_init_residual_makes_every_block_an_identity_branch(preact: bool) -> None:
    model = ResNet(depth=8, preact=preact, zero_init_residual=True).eval()
    for block in (m for m in model.modules() if isinstance(m, BasicBlock)):
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        if block.shortcut is None:
            expected = x if preact else torch.relu(x)
            torch.testing.assert_close(block(x), expected)


def test_fixup_resnet_has_no_normalization_and_starts_as_identity_blocks() -> None:
    model = FixupResNet(depth=20)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, FixupBasicBlock)]
    assert len(blocks) == 9
    assert all(torch.count_nonzero(b.conv2.weight) == 0 for b in blocks)
    # Every residual branch is zero at init, so the network's output is exactly its head bias (zero).
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ResNet, {"depth": 21}, r"6n\+2"),
        (ResNet, {"width": 0}, "width must be positive"),
        (DeepPlainCNN, {"depth": 3}, "at least 5"),
        (DeepPlainCNN, {"activation": "swish"}, "Unknown activation"),
        (BatchNormCNN, {"norm": "none"}, "needs a normalization"),
        (PlainCNN, {"lr": -1.0}, "lr must be a positive"),
        (PlainCNN, {"optimizer": "lbfgs"}, "optimizer must be one of"),
        (PlainCNN, {"warmup_fraction": 1.5}, "warmup_fraction"),
    ],
)
def test_invalid_arguments_raise_at_construction(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS)
def test_defaults_train_loss_stays_finite_and_falls(cls: type[ImageClassifier], kwargs: dict, tmp_path) -> None:
    """Every variant at its default optimizer settings: a few steps on learnable data lower the loss."""
    torch.manual_seed(0)
    model = cls(**{k: v for k, v in kwargs.items() if k == "depth"})
    data = SyntheticImages(num=256, batch_size=32)
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    quiet_trainer(tmp_path, max_steps=24, limit_val_batches=0, callbacks=[Losses()]).fit(model, data)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6


def test_a_fit_that_diverges_raises_instead_of_ending_quietly(tmp_path) -> None:
    from stabilize.errors import TrainingDivergedError

    model = DeepPlainCNN(depth=8, lr=50.0, scheduler="constant")
    with pytest.raises(TrainingDivergedError, match="NaN/Inf after 8 optimizer steps"):
        quiet_trainer(tmp_path, max_steps=8, limit_val_batches=0).fit(model, SyntheticImages(num=64, batch_size=8))


def test_init_scale_above_one_makes_a_deep_plain_net_explode_and_batchnorm_undoes_it() -> None:
    torch.manual_seed(0)
    images, labels = prototype_images(32)

    def gradient_norm(model: ImageClassifier) -> float:
        F.cross_entropy(model(images), labels).backward()
        return torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())).item()

    exploded = gradient_norm(DeepPlainCNN(depth=20, init_scale=1.5))
    assert exploded > 1e3 and exploded > 100 * gradient_norm(DeepPlainCNN(depth=20))
    assert gradient_norm(BatchNormCNN(depth=20, init_scale=1.5)) < 100
