from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from stabilize.errors import DataTypeError
from stabilize.models import FastCNN, ImageClassifier, ResNet
from stabilize.models.base import cosine_with_warmup
from tests.helpers.data import SyntheticImages
from tests.helpers.trainer import quiet_trainer


class LearningRateRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def run(model: ImageClassifier, steps: int, tmp_path: Path, **kwargs) -> LearningRateRecorder:
    recorder = LearningRateRecorder()
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=[recorder], **kwargs)
    trainer.fit(model, SyntheticImages(num=64, batch_size=8))
    return recorder


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "constant"])
def test_every_optimizer_and_schedule_builds_and_steps(optimizer: str, scheduler: str, tmp_path: Path) -> None:
    model = ResNet(depth=8, optimizer=optimizer, scheduler=scheduler, lr=0.01, warmup_fraction=0.25)
    before = [p.detach().clone() for p in model.parameters()]
    recorder = run(model, 8, tmp_path)
    assert len(recorder.lrs) == 8
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed == len(before)
    expected_class = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "rmsprop": torch.optim.RMSprop,
    }[optimizer]
    assert type(model.trainer.optimizers[0]) is expected_class
    if scheduler == "constant":
        assert recorder.lrs == [0.01] * 8
    elif scheduler == "cosine":
        # 2 warm-up steps of 8, stepping once per optimizer step.
        assert recorder.lrs[:3] == pytest.approx([0.005, 0.01, 0.01])
        assert recorder.lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    else:
        assert recorder.lrs[0] == pytest.approx(0.01 / 25)  # OneCycleLR starts at max_lr / div_factor
        assert max(recorder.lrs) == pytest.approx(0.01, rel=0.05)
        assert recorder.lrs[-1] < recorder.lrs[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_the_optimizers_batch_their_steps_and_step_exactly_as_per_parameter_loops(optimizer: str) -> None:
    # foreach runs the same operations per tensor as the per-parameter loop, only batched, and CPU-fused SGD the same
    # arithmetic in one kernel: at this constant learning rate with weight decay the weights after some steps are
    # bitwise equal (on the CPU, where PyTorch would otherwise pick the loop); under a schedule fused SGD rounds a few
    # ulps apart (the next test). Adam's fused kernel rounds differently, so Adam and AdamW stay foreach.
    torch.manual_seed(0)
    models = [ResNet(depth=8, optimizer=optimizer, lr=0.01, weight_decay=1e-3, scheduler="constant") for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    grouped = models[0].configure_optimizers()
    accepted = inspect.signature(type(grouped)).parameters  # AdamW's defaults hold a key its constructor refuses
    settings = {key: value for key, value in grouped.defaults.items() if key in accepted}
    unbatched = {key: False for key in ("foreach", "fused") if key in accepted}  # RMSprop has no fused kernel
    looped = type(grouped)(models[1].parameter_groups(), **{**settings, **unbatched})
    batched = "fused" if optimizer == "sgd" else "foreach"
    assert grouped.defaults[batched] is True
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, optimizer_ in zip(models, (grouped, looped)):
            optimizer_.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer_.step()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_fused_sgd_under_a_changing_learning_rate_agrees_with_the_loop_to_rounding() -> None:
    # What the bitwise test above does not cover: a warm-up changes the rate at every step, and the fused kernel then
    # rounds differently from the per-parameter loop (found when a fresh quickstart differed from the committed one in
    # the third decimal of the loss). The same gradients are fed to both, so that only the update's rounding is
    # compared: training itself amplifies any rounding (after 10 steps of this net on one thread, the float32 loop, the
    # foreach and the fused steps all sit 3e-4 from a float64 run), which is why whole runs differ in late digits. Ten
    # float32 steps of a few operations each, ~6e-8 relative per rounding: 1e-5 of each weight's scale (plus 1e-7
    # absolute near 0) is rounding, and a real difference in the rule (a momentum or weight-decay term: 1e-3 of a
    # step or more) fails it.
    torch.manual_seed(0)
    models = [ResNet(depth=8, lr=0.05, weight_decay=5e-4, scheduler="constant") for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    fused = models[0].configure_optimizers()
    looped = torch.optim.SGD(models[1].parameter_groups(), lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(10):
        gradients = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, (fused, looped)):
            for group in optimizer.param_groups:
                group["lr"] = 0.05 * (step + 1) / 10  # a linear warm-up
            for parameter, gradient in zip(model.parameters(), gradients):
                parameter.grad = gradient.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fp16_amp", [False, True])
def test_sgd_runs_fused_except_under_a_grad_scaler_where_lightning_must_still_clip(fp16_amp: bool, tmp_path) -> None:
    # Lightning turns precision="16-mixed" into bf16 on CPU; the plugin with a CPU GradScaler keeps real fp16 AMP.
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if fp16_amp else []
    model = ResNet(depth=8, lr=0.01, scheduler="constant")
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, gradient_clip_val=0.5, plugins=plugins)
    trainer.fit(model, SyntheticImages(num=32, batch_size=8))  # a fused optimizer here: Lightning refuses to clip
    settings = trainer.optimizers[0].defaults
    assert (settings["fused"], settings["foreach"]) == ((None, True) if fp16_amp else (True, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_smoothing_from_the_lookup_table_is_pytorchs_loss(dtype: torch.dtype) -> None:
    model = ResNet(depth=8, num_classes=10, label_smoothing=0.2)
    logits = torch.randn(16, 10, dtype=dtype, requires_grad=True, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    ours = torch.nn.functional.cross_entropy(logits, model._smoothed_targets(labels, logits))
    (ours_grad,) = torch.autograd.grad(ours, logits)
    theirs = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    # The same sums in another order: equal to a few units in the last place of the dtype (2.4e-7 in float32 here).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours, theirs, rtol=4 * eps, atol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=4 * eps, atol=4 * eps)
    # Under bf16 autocast the loss runs in float32, and so does the table (bf16 would round 0.82 to 0.8203).
    assert model._smoothed_targets(labels, logits.bfloat16()).dtype == torch.float32


def test_cosine_with_warmup_shape() -> None:
    multiplier = cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert multiplier(0) == pytest.approx(0.1)
    assert multiplier(9) == pytest.approx(1.0)
    assert multiplier(55) == pytest.approx(0.5)
    assert multiplier(100) == pytest.approx(0.0)
    # nanoGPT's schedule ends at a tenth of the peak: halfway down the cosine is then 0.1 + 0.9 * 0.5.
    to_a_tenth = cosine_with_warmup(total_steps=100, warmup_steps=10, final=0.1)
    assert to_a_tenth(9) == pytest.approx(1.0) and to_a_tenth(55) == pytest.approx(0.55)
    assert to_a_tenth(100) == pytest.approx(0.1) and to_a_tenth(10_000) == pytest.approx(0.1)


def test_sgd_uses_nesterov_momentum_and_weight_decay_skips_norms_and_biases() -> None:
    model = ResNet(depth=8, weight_decay=1e-3, momentum=0.8, scheduler="constant")
    optimizer = model.configure_optimizers()
    assert optimizer.defaults["nesterov"]
    assert optimizer.defaults["momentum"] == 0.8
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-3
    assert plain["weight_decay"] == 0.0
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    bias_params = {id(m.bias) for m in model.modules() if isinstance(m, nn.Linear)}
    decayed_ids = {id(p) for p in decayed["params"]}
    assert not (norm_params | bias_params) & decayed_ids
    assert {id(p) for p in plain["params"]} == norm_params | bias_params
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert conv_weights <= decayed_ids


def test_scheduler_needs_a_finite_run(tmp_path: Path) -> None:
    model = ResNet(depth=8, scheduler="cosine")
    trainer = quiet_trainer(tmp_path, max_epochs=-1)
    with pytest.raises(ValueError, match="finite training length"):
        trainer.fit(model, SyntheticImages(num=16, batch_size=8))


def test_logs_documented_metrics(tmp_path: Path) -> None:
    model = ResNet(depth=8, scheduler="constant")
    trainer = quiet_trainer(tmp_path, max_epochs=1, log_every_n_steps=1)
    trainer.fit(model, SyntheticImages(num=32, batch_size=8))
    assert {"train/loss_step", "train/acc_step", "train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc"} <= set(
        trainer.callback_metrics
    )
    trainer.test(model, SyntheticImages(num=32, batch_size=8), verbose=False)
    assert {"test/loss", "test/acc"} <= set(trainer.callback_metrics)
    assert 0.0 <= trainer.callback_metrics["test/acc"].item() <= 1.0


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (torch.randn(3, 32, 32), ValueError, r"shape \(N, 3, H, W\).*unsqueeze"),
        (torch.randn(2, 1, 32, 32), ValueError, "expects 3 input channels"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point images.*uint8"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_fail_at_once_with_what_was_expected(images, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ResNet(depth=8)(images)


def test_plain_cnn_insists_on_32x32() -> None:
    from stabilize.models import PlainCNN

    with pytest.raises(ValueError, match="expects 32x32 images"):
        PlainCNN()(torch.randn(2, 3, 64, 64))


class NaNAtBatch(SyntheticImages):
    """Synthetic data whose batch 3 contains a NaN pixel."""

    def __init__(self) -> None:
        super().__init__(num=64, batch_size=8)
        self.images[3 * 8 + 1, 0, 5, 5] = float("nan")


def test_nonfinite_inputs_are_caught_at_the_next_logging_step(tmp_path: Path) -> None:
    model = ResNet(depth=8, scheduler="constant")
    trainer = quiet_trainer(tmp_path, max_epochs=1, log_every_n_steps=5, limit_val_batches=0)
    data = NaNAtBatch()
    data.train_dataloader = lambda: torch.utils.data.DataLoader(  # fixed order: batch 3 holds the NaN
        torch.utils.data.TensorDataset(data.images, data.labels), batch_size=8
    )
    with pytest.raises(ValueError, match="contain NaN or Inf pixels"):
        trainer.fit(model, data)
    # Checked on logging steps only: the batch at index 3 is reported when batch 4 (the 5th) ends.
    assert trainer.global_step == 5


@pytest.mark.parametrize(("pixel", "counted"), [(math.nan, 1), (math.inf, 1), (-math.inf, 1), (3e38, 0), (0.5, 0)])
def test_the_nonfinite_input_count_sees_nan_and_both_infinities_only(pixel: float, counted: int) -> None:
    model = ResNet(depth=8)
    images = torch.full((4, 3, 32, 32), 3e38)  # finite, and their sum would overflow: must not count
    images[2, 1, 5, 7] = pixel
    model.training_step((images, torch.zeros(4, dtype=torch.long)), 0)
    assert int(model._nonfinite_input_batches) == counted


def test_the_weight_dtype_check_follows_conversions() -> None:
    model = ResNet(depth=8)
    model.check_input(torch.zeros(2, 3, 32, 32))  # float32 images, float32 weights
    model.double()
    with pytest.raises(DataTypeError, match=r"holds torch\.float64 weights"):
        model.check_input(torch.zeros(2, 3, 32, 32))
    model.check_input(torch.zeros(2, 3, 32, 32, dtype=torch.float64))


def test_user_subclass_supplies_only_its_network(tmp_path: Path) -> None:
    class TinyNet(ImageClassifier):
        def __init__(self, hidden: int = 8, **kwargs) -> None:
            super().__init__(**kwargs)

        def build_network(self) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(3, self.hparams.hidden, 3),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(self.hparams.hidden, self.hparams.num_classes),
            )

    model = TinyNet(hidden=4, lr=0.05)
    assert model.hparams.hidden == 4
    assert model.hparams.lr == 0.05
    run(model, 3, tmp_path)
    assert model.network[0].out_channels == 4


def test_missing_build_network_says_what_to_do() -> None:
    with pytest.raises(NotImplementedError, match="must override build_network"):
        ImageClassifier()


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    reference = ResNet(depth=8).eval()
    fast = ResNet(depth=8, channels_last=True).eval()
    fast.load_state_dict(reference.state_dict())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), reference(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_builds_one_graph_without_recompiles_and_keeps_checkpoint_keys(tmp_path: Path) -> None:
    """torch.compile on CPU (inductor, about a minute): compiled once, no recompiles while training."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ResNet(depth=8, compile=True, scheduler="constant")
    run(model, 6, tmp_path)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    assert all(not key.startswith("_compiled") and "_orig_mod" not in key for key in model.state_dict())
    eager = ResNet(depth=8).eval()
    eager.load_state_dict(model.state_dict())
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), eager(images), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("model", "images", "error", "message"),
    [
        (lambda: ResNet(depth=8), torch.zeros(2, 3, 32, 32, dtype=torch.float64), TypeError, "float32 weights but got"),
        (lambda: ResNet(depth=8), torch.zeros(2, 3, 32, 32, dtype=torch.float16), TypeError, "float32 weights but got"),
        (lambda: FastCNN(), torch.zeros(2, 3, 8, 8), ValueError, "at least 9x9 pixels"),
    ],
)
def test_inputs_that_do_not_fit_fail_with_one_clear_message(model, images, error, message: str) -> None:
    from stabilize.errors import StabilizeError

    with pytest.raises(error, match=message) as info:
        model()(images)
    assert isinstance(info.value, StabilizeError)


def test_num_classes_mismatch_with_the_datamodule_fails_at_setup(tiny_cifar, tmp_path) -> None:
    from stabilize.datamodules import CIFAR10DataModule

    model = ResNet(depth=8, num_classes=5)
    with pytest.raises(ValueError, match=r"CIFAR10DataModule has 10 classes .* num_classes=5"):
        quiet_trainer(tmp_path, max_steps=1).fit(model, CIFAR10DataModule(str(tiny_cifar), val_size=40))


def test_nan_pixels_stop_the_run_before_a_checkpoint_is_written(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stabilize.errors import DataError

    model = ResNet(depth=8, scheduler="constant")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, log_every_n_steps=50, limit_val_batches=0, callbacks=[saver], enable_checkpointing=True
    )
    with pytest.raises(DataError, match="NaN or Inf pixels"):
        trainer.fit(model, NaNAtBatch())
    written = list((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(written) < 8  # the run stopped at the batch with the NaN pixel
    for path in written:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path.name
