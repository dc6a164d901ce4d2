from __future__ import annotations

import contextlib
import csv
import json
import math
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stabilize.callbacks import GradientHealthCallback
from stabilize.health import monitor as monitor_module
from stabilize.health import verdict, verdict_class
from stabilize.models import BatchNormCNN, DeepPlainCNN, ResNet
from tests.callbacks.helpers import GradientProbe, TinyMLP
from tests.helpers.commands import python_script
from tests.helpers.data import SyntheticImages
from tests.helpers.trainer import quiet_trainer

LAYERS = ["body.0", "body.1", "body.3", "head"]


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    """The rows the CSVLogger wrote, as dicts keyed by metric name ("" where a row has no value)."""
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def trainer(tmp_path: Path, callbacks: list, steps: int = 4, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, max_steps=steps, callbacks=callbacks, **kwargs)


# ----------------------------------------------------------------------------------------------- the numbers
def test_norms_and_ratios_equal_a_hand_computation(tmp_path: Path) -> None:
    seed_everything(0)
    health, probe = GradientHealthCallback(log_every_n_steps=2, verbose=False), GradientProbe()
    model = TinyMLP(lr=0.1)
    trainer(tmp_path, [health, probe], steps=5).fit(model)
    assert [r["step"] for r in health.history] == [0, 2, 4]
    for record in health.history:
        step = record["step"]
        assert list(record["layers"]) == LAYERS  # forward order, qualified module names
        for layer in LAYERS:
            stats = record["layers"][layer]
            grad, weight = probe.layer_norm(step, layer), probe.layer_norm(step, layer, "weights")
            assert stats["grad_norm"] == pytest.approx(grad, rel=1e-6)
            assert stats["weight_norm"] == pytest.approx(weight, rel=1e-6)
            # Plain SGD: w_after - w_before = -lr * grad, exactly.
            assert stats["update_to_weight"] == pytest.approx(0.1 * grad / weight, rel=1e-5)
        total = math.sqrt(sum(probe.layer_norm(step, layer) ** 2 for layer in LAYERS))
        assert record["global_norm"] == pytest.approx(total, rel=1e-6)
        norms = [probe.layer_norm(step, layer) for layer in LAYERS]
        assert record["depth_ratio"] == pytest.approx(norms[0] / norms[-1], rel=1e-6)
        assert record["min_layer_norm"] == pytest.approx(min(norms), rel=1e-6)
        assert record["max_layer_norm"] == pytest.approx(max(norms), rel=1e-6)


def test_bf16_mixed_norms_match_within_bf16_tolerance(tmp_path: Path) -> None:
    seed_everything(0)
    health, probe = GradientHealthCallback(log_every_n_steps=1, verbose=False), GradientProbe()
    trainer(tmp_path, [health, probe], steps=3, precision="bf16-mixed").fit(TinyMLP())
    for record in health.history:
        for layer in LAYERS:
            assert record["layers"][layer]["grad_norm"] == pytest.approx(
                probe.layer_norm(record["step"], layer), rel=1e-2
            )


def test_fp16_amp_logs_unscaled_norms_and_counts_overflow_as_amp_skipped(tmp_path: Path) -> None:
    """The real GradScaler (CPU) path: norms equal the fp32 run's, not 65536x larger; overflow is no explosion."""
    seed_everything(0)
    reference = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    trainer(tmp_path, [reference], steps=1).fit(TinyMLP())
    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    # Lightning turns precision="16-mixed" into bf16 on CPU; the plugin with a CPU GradScaler keeps real fp16 AMP.
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    amp_trainer = trainer(tmp_path, [health], steps=4, plugins=[plugin])
    model = TinyMLP(loss_scale_at={2: float("inf")})
    amp_trainer.fit(model)
    assert amp_trainer.precision_plugin.scaler is not None
    assert health.history[0]["global_norm"] == pytest.approx(reference.history[0]["global_norm"], rel=2e-2)
    assert sum(r["amp_skipped"] for r in health.history) == 1
    assert sum(r["exploding_steps"] for r in health.history) == 0
    assert sum(r["nonfinite_tensors"] for r in health.history) == 0
    summary = health.summary()["optimizer_0"]
    assert summary["amp_skipped_steps"] == 1 and summary["explosions"] == []


# -------------------------------------------------------------------------------------------- classification
def fit_20_layers(model, tmp_path: Path) -> GradientHealthCallback:
    health = GradientHealthCallback(log_every_n_steps=5, verbose=False)
    trainer(tmp_path, [health], steps=20, limit_val_batches=0).fit(model, SyntheticImages(num=640, batch_size=32))
    return health


def test_deep_sigmoid_small_init_is_flagged_vanishing_within_20_steps(tmp_path: Path) -> None:
    seed_everything(0)
    model = DeepPlainCNN(depth=20, activation="sigmoid", init="small_normal", scheduler="constant", lr=0.05)
    health = fit_20_layers(model, tmp_path)
    vanishing = health.history[-1]["vanishing_layers"]
    assert len(vanishing) >= 10
    assert "network.0.0" in vanishing  # the first conv, furthest from the loss
    assert health.summary()["optimizer_0"]["vanishing_layers_now"]["network.0.0"] == 0  # since the first step
    report = health.diagnosis(model)
    assert "VANISHING" in report and "network.0.0" in report
    assert "add normalization" in report and "residual connections" in report and "sigmoid" in report


@pytest.mark.parametrize(
    "model_factory",
    [
        pytest.param(
            lambda: BatchNormCNN(depth=20, activation="sigmoid", init="small_normal", scheduler="constant", lr=0.05),
            id="batchnorm",
        ),
        pytest.param(
            lambda: ResNet(depth=20, activation="sigmoid", init="small_normal", scheduler="constant", lr=0.05),
            id="residual",
        ),
    ],
)
def test_same_depth_with_batchnorm_or_residuals_is_not_flagged(model_factory, tmp_path: Path) -> None:
    seed_everything(0)
    health = fit_20_layers(model_factory(), tmp_path)
    assert all(record["vanishing_layers"] == [] for record in health.history)
    assert "Healthy" in health.diagnosis()


def test_a_single_planted_spike_is_transient_and_a_run_of_them_exploding(tmp_path: Path) -> None:
    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=4, warmup_steps=3, verbose=False)
    trainer(tmp_path, [health], steps=8).fit(TinyMLP(lr=1e-9, loss_scale_at={5: 1e6}))
    # Step 5 lies after the last regular logging step (4): the fit's last step (7) always gets a record, which reads it.
    assert [(r["step"], r["spike_steps"]) for r in health.history] == [(0, 0), (4, 0), (7, 1)]
    summary = health.summary()["optimizer_0"]
    assert summary["explosions"] == []
    (spike,) = summary["transient_spikes"]
    assert (spike["first_step"], spike["last_step"], spike["steps"], spike["longest_run"]) == (5, 5, 1, 1)
    assert spike["max_norm"] > 1e4 and spike["peak_ratio"] > 1e5
    assert health.diagnosis().count("EXPLODING") == 0 and "Transient: 1 transient spike" in health.diagnosis()

    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=4, warmup_steps=3, spike_persistence=5, verbose=False)
    planted = dict.fromkeys(range(5, 12), 1e6)
    trainer(tmp_path, [health], steps=14).fit(TinyMLP(lr=1e-9, loss_scale_at=planted))
    (explosion,) = health.summary()["optimizer_0"]["explosions"]
    # Steps 5-10 are a run of spikes (6 planted norms of 11 in the window at step 11 make its median planted-level),
    # cut in two by the logging step 8 and joined again by the classification.
    assert (explosion["first_step"], explosion["last_step"], explosion["rule"]) == (5, 10, "persistent")
    assert "EXPLODING" in health.diagnosis() and "gradient_clip_val" in health.diagnosis()


def test_relative_jump_over_the_running_median_is_a_spike(tmp_path: Path) -> None:
    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=1, median_window=4, verbose=False)
    trainer(tmp_path, [health], steps=7).fit(TinyMLP(lr=1e-9, loss_scale_at={6: 50.0}))
    assert [r["spike_steps"] for r in health.history] == [0, 0, 0, 0, 0, 0, 1]
    assert health.history[-1]["max_norm"] == health.history[-1]["global_norm"]


# ---------------------------------------------------------------------------------------- non-finite policies
NAN_AT = {3: float("nan")}


def test_nonfinite_warn_records_and_warns(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    # "warn" lets the NaN step through, so the weights and every later gradient are NaN too.
    with pytest.warns(UserWarning, match=r"16 non-finite gradient tensor\(s\) between optimizer steps 3 and 4"):
        trainer(tmp_path, [health], steps=5).fit(TinyMLP(loss_scale_at=NAN_AT))
    event = health.summary()["optimizer_0"]["nonfinite"][0]
    assert (event["first_step"], event["last_step"], event["tensors"]) == (3, 4, 16)
    assert event["layers"] == LAYERS
    assert "NON-FINITE gradients from step 3" in health.diagnosis()


def test_nonfinite_skip_leaves_weights_and_optimizer_state_untouched(tmp_path: Path) -> None:
    seed_everything(0)
    health, probe = GradientHealthCallback(on_nonfinite="skip", verbose=False), GradientProbe()
    model = TinyMLP(momentum=0.9, loss_scale_at=NAN_AT)
    snapshots = {}

    class Snapshot(GradientProbe):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            optimizer = trainer.optimizers[0]
            snapshots[trainer.global_step] = (
                {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                {
                    id(p): optimizer.state[p]["momentum_buffer"].clone()
                    for p in pl_module.parameters()
                    if "momentum_buffer" in optimizer.state[p]
                },
            )

    with pytest.warns(UserWarning, match="skipped optimizer step 3"):
        trainer(tmp_path, [health, probe, Snapshot()], steps=6).fit(model)
    weights_before, momentum_before = snapshots[3]
    weights_after, momentum_after = snapshots[4]
    for name, value in weights_before.items():
        torch.testing.assert_close(weights_after[name], value, rtol=0, atol=0)
    assert momentum_before.keys() == momentum_after.keys() and momentum_before
    for key, value in momentum_before.items():
        torch.testing.assert_close(momentum_after[key], value, rtol=0, atol=0)
    assert health.summary()["optimizer_0"]["skipped_steps"] == [3]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # training went on, healthy
    assert not torch.equal(snapshots[5][0]["head.weight"], snapshots[4][0]["head.weight"])


def test_nonfinite_raise_names_the_step_and_layers_after_the_diagnosis_so_far(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    health = GradientHealthCallback(on_nonfinite="raise", log_every_n_steps=10, warmup_steps=1)
    model = TinyMLP(lr=1e-9, loss_scale_at={1: 1e6, **NAN_AT})
    with (
        caplog.at_level("INFO"),
        pytest.raises(FloatingPointError, match=r"optimizer step 3 in 4 layer\(s\): body\.0, body\.1, body\.3, head"),
    ):
        trainer(tmp_path, [health], steps=6).fit(model)
    # Counted before the NaN, and an explosion because the NaN followed it.
    assert "EXPLODING: 1 step(s) far above the running median (steps 1;" in caplog.text
    assert "rule 'nonfinite'" in caplog.text


# ----------------------------------------------------------------------------------------------- cost contract
@contextlib.contextmanager
def host_syncs_forbidden():
    """Make every tensor-to-host conversion raise while active."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbidden(self, *args, **kwargs):
        raise AssertionError("host sync on a non-logging step")

    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("chunk_steps", [64, 2])
def test_no_host_transfer_on_non_logging_steps_with_the_default_policy(
    tmp_path: Path, chunk_steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With chunks of 2 steps the explosion rules' counting also runs on non-logging steps.
    monkeypatch.setattr(monitor_module, "CHUNK_STEPS", chunk_steps)

    class Guarded(GradientHealthCallback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:
            with host_syncs_forbidden():  # the loss the explosion rules read stays on the device
                super().on_before_backward(trainer, pl_module, loss)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            logging_step = trainer.global_step % self._every == 0
            with contextlib.nullcontext() if logging_step else host_syncs_forbidden():
                super().on_before_optimizer_step(trainer, pl_module, optimizer)

    health = Guarded(log_every_n_steps=5, warmup_steps=3, verbose=False)
    trainer(tmp_path, [health], steps=11).fit(TinyMLP(loss_scale_at={7: 1e6}))
    assert health.summary()["optimizer_0"]["steps"] == 11
    assert [r["step"] for r in health.history] == [0, 5, 10]
    last = health.history[-1]
    assert last["spike_steps"] == 1  # the spike at step 7 was still counted on the device
    assert last["max_norm"] > 1e3 * last["global_norm"] and math.isfinite(last["loss"])


# ------------------------------------------------------------------------------------------------ where it hooks
def test_gradient_accumulation_records_the_step_that_steps(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    trainer(tmp_path, [health], steps=3, accumulate_grad_batches=2).fit(TinyMLP())
    assert health.summary()["optimizer_0"]["steps"] == 3
    assert [r["step"] for r in health.history] == [0, 1, 2]


class TwoOptimizers(TinyMLP):
    """Manual optimization with one optimizer for the body and one for the head."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body_opt, head_opt = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        body_opt.step()
        head_opt.step()
        body_opt.zero_grad()
        head_opt.zero_grad()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=0.01))


def test_manual_optimization_with_two_optimizers_prefixes_keys(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, [health], steps=6, logger=logger).fit(TwoOptimizers())
    assert list(health.history_of(0)[0]["layers"]) == ["body.0", "body.1", "body.3"]
    assert list(health.history_of(1)[0]["layers"]) == ["head"]
    header = csv_rows(logger)[0].keys()
    # Each optimizer is named after the submodule holding its parameters.
    assert "grad_health/body/global_norm" in header and "grad_norm/head/head" in header
    assert "Gradient health of the head" in health.diagnosis() and set(health.summary()) == {"body", "head"}


def test_optimizers_over_parts_of_one_submodule_keep_numbered_names() -> None:
    from stabilize.callbacks.optimizers import optimizer_name

    module = TwoOptimizers()
    first, second = list(module.body.parameters())[:2], [*list(module.body.parameters())[2:], module.head.weight]
    assert optimizer_name(module, torch.optim.SGD(first, lr=0.1), 0) == "body"
    assert optimizer_name(module, torch.optim.SGD(second, lr=0.1), 1) == "optimizer_1"


def test_works_with_lightnings_boring_model_and_logs_documented_keys(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=2, track_activations=True, verbose=False)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, [health], steps=4, logger=logger).fit(BoringModel())
    header = set(csv_rows(logger)[0])
    expected = {
        f"grad_health/{k}"
        for k in (
            "global_norm",
            "depth_ratio",
            "vanishing_layers",
            "exploding",
            "nonfinite",
            "amp_skipped",
            "min_layer_norm",
            "max_layer_norm",
        )
    }
    expected |= {"grad_norm/layer", "grad_to_weight/layer", "update_to_weight/layer"}
    assert expected <= header


def test_activation_statistics_on_logging_steps(tmp_path: Path) -> None:
    seed_everything(0)
    model = TinyMLP()
    with torch.no_grad():
        model.body[3].weight.mul_(100.0)  # tanh saturates
    health = GradientHealthCallback(log_every_n_steps=2, track_activations=True, verbose=False)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, [health], steps=3, logger=logger).fit(model)
    first = csv_rows(logger)[0]
    assert float(first["activation_saturated/body.4"]) > 0.9
    assert 0.0 <= float(first["activation_dead/body.2"]) < 0.5  # ReLU after BatchNorm: few dead channels
    assert not health._activations.attached  # hooks exist only during logging steps


def test_dead_relu_channels_are_counted(tmp_path: Path) -> None:
    model = TinyMLP()
    with torch.no_grad():
        model.body[1].bias.fill_(-100.0)  # every ReLU input negative: all channels dead
    health = GradientHealthCallback(track_activations=True, log_every_n_steps=1, verbose=False)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, [health], steps=1, logger=logger).fit(model)
    assert float(csv_rows(logger)[0]["activation_dead/body.2"]) == 1.0
    summary = health.summary()["optimizer_0"]
    assert summary["dead_units"] == {"body.2": 1.0}
    assert "dead units (1 activation module at least half dead)" in verdict(summary)
    assert (
        verdict_class(summary) == "vanishing" and "DEAD UNITS: channels with no positive output" in health.diagnosis()
    )


# ---------------------------------------------------------------------------------------------------- outputs
def test_tensorboard_has_scalars_histograms_and_the_flow_figure(tmp_path: Path) -> None:
    seed_everything(0)
    health = GradientHealthCallback(
        log_every_n_steps=2,
        histogram_every_n_steps=2,
        figure_every_n_steps=4,
        histogram_min_interval_s=0,
        figure_min_interval_s=0,
        verbose=False,
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    model = DeepPlainCNN(depth=8, activation="sigmoid", init="small_normal", scheduler="constant")
    trainer(tmp_path, [health], steps=5, logger=logger, limit_val_batches=0).fit(model, SyntheticImages(64, 16))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in (
        "grad_health/global_norm",
        "grad_health/depth_ratio",
        "grad_health/vanishing_layers",
        "grad_health/exploding",
        "grad_health/nonfinite",
        "grad_health/amp_skipped",
        "grad_norm/network.0.0",
        "grad_to_weight/network.0.0",
        "update_to_weight/network.0.0",
    ):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("grad_health/global_norm")] == [0, 2, 4]
    assert "grad_hist/network.0.0" in tags["histograms"]
    assert list(health.history[0]["layers"])[-1] == "network.7.2"  # the head's linear layer
    histogram = events.Histograms("grad_hist/network.7.2")[0].histogram_value
    assert histogram.num == 650 and len(histogram.bucket) == 64 and sum(histogram.bucket) == 650  # 64*10 + 10
    magnitudes = events.Histograms("grad_log10/network.7.2")[0].histogram_value
    assert magnitudes.num == sum(magnitudes.bucket) and 0 < magnitudes.num <= 650  # non-zero values only
    assert -12 < magnitudes.min < magnitudes.max < 2  # orders of magnitude, not 0.0000... labels
    assert "grad_health/flow" in tags["images"]
    assert [e.step for e in events.Images("grad_health/flow")] == [0, 4]


def test_diagnosis_summary_json_and_checkpoint_resume(tmp_path: Path) -> None:
    seed_everything(0)
    model = DeepPlainCNN(depth=12, activation="sigmoid", init="small_normal", scheduler="constant")
    health = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    first = trainer(tmp_path, [health], steps=4, limit_val_batches=0)
    first.fit(model, SyntheticImages(64, 16))
    checkpoint = tmp_path / "resume.ckpt"
    first.save_checkpoint(checkpoint)
    health.save_json(tmp_path / "health.json")
    saved = json.loads((tmp_path / "health.json").read_text())
    assert saved["summary"]["optimizer_0"]["vanishing_layers_now"]["network.0.0"] == 0
    assert [r["step"] for r in saved["history"]["optimizer_0"]] == [0, 2, 3]  # every 2 steps, and the last

    resumed = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    second = trainer(tmp_path, [resumed], steps=8, limit_val_batches=0)
    second.fit(
        DeepPlainCNN(depth=12, activation="sigmoid", init="small_normal", scheduler="constant"),
        SyntheticImages(64, 16),
        ckpt_path=checkpoint,
    )
    assert [r["step"] for r in resumed.history] == [0, 2, 3, 4, 6, 7]
    summary = resumed.summary()["optimizer_0"]
    assert summary["steps"] == 8
    assert summary["vanishing_layers_now"]["network.0.0"] == 0  # the streak survived the resume


def test_diagnosis_is_printed_at_the_end_of_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        trainer(tmp_path, [GradientHealthCallback(log_every_n_steps=1)], steps=2).fit(TinyMLP())
    assert "Gradient health after 2 optimizer steps" in caplog.text


# ----------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vanishing_threshold": -1.0}, "vanishing_threshold must be a positive finite"),
        ({"exploding_threshold": float("nan")}, "exploding_threshold must be None or a positive finite"),
        ({"warmup_steps": 0}, "warmup_steps must be a positive integer"),
        ({"spike_persistence": 1.5}, "spike_persistence must be a positive integer"),
        ({"vanishing_threshold": 10.0, "exploding_threshold": 1.0}, "must be below exploding_threshold"),
        ({"vanishing_ratio": 1.5}, "vanishing_ratio must be in"),
        ({"exploding_factor": 0.5}, "exploding_factor must be above 1"),
        ({"median_window": 1}, "median_window must be an integer from 3"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be"),
        ({"on_unhealthy": "raise"}, "on_unhealthy must be 'warn', 'stop' or 'ignore'"),
        ({"log_every_n_steps": 0}, "log_every_n_steps must be positive"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps must be a non-negative integer"),
        ({"saturation_threshold": 0.2}, "saturation_threshold"),
        ({"log_every_n_steps": float("nan")}, "log_every_n_steps must be a non-negative integer"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps must be a non-negative integer"),
        ({"log_every_n_steps": True}, "log_every_n_steps must be a non-negative integer"),
        ({"median_window": 10**9}, "median_window must be an integer from 3 to 100000"),
        ({"figure_min_interval_s": -1}, "figure_min_interval_s must be a non-negative number of seconds"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientHealthCallback(**kwargs)


def test_flat_parameter_strategies_are_refused_at_setup() -> None:
    fake_trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), log_every_n_steps=50)
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy.*fully_shard"):
        GradientHealthCallback().setup(fake_trainer, BoringModel(), "fit")


# --------------------------------------------------------------------------------------------------- DDP and CLI
DISTRIBUTED_SCRIPT = """
import json, sys, torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Subset
from stabilize.callbacks import GradientHealthCallback
from tests.callbacks.helpers import TinyMLP, fixed_data


class Sharded(TinyMLP):
    \"\"\"Global batch 16: rank r of w takes samples r, r+w, ... so every step sees the same 16 samples.\"\"\"

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        data = fixed_data()
        return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=16 // world)

    def configure_model(self):
        if strategy == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for part in (self.body, self.head):
                fully_shard(part, mesh=mesh)
            fully_shard(self, mesh=mesh)


devices, strategy, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
seed_everything(0)
health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
model = Sharded()
model.body[1] = torch.nn.Identity()  # BatchNorm statistics are per process: keep the comparison exact
chosen = {"single": "auto", "ddp": "ddp", "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}
trainer = Trainer(accelerator="cpu", devices=devices, strategy=chosen[strategy], max_steps=3,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  use_distributed_sampler=False, callbacks=[health])
trainer.fit(model)
if trainer.is_global_zero:
    json.dump(health.history, open(out, "w"))
"""


@pytest.fixture(scope="module")
def single_process_history(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The reference of the distributed tests, run once for all of them."""
    return distributed_history(tmp_path_factory.mktemp("single"), 1, "single")


def distributed_history(tmp_path: Path, devices: int, strategy: str) -> list[dict]:
    script = tmp_path / "distributed_run.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    out = tmp_path / f"history_{strategy}.json"
    python_script(script, str(devices), strategy, str(out), cwd=tmp_path)
    return json.loads(out.read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distributed_numbers_equal_the_single_process_run(
    tmp_path: Path, strategy: str, single_process_history: list[dict]
) -> None:
    """DDP all-reduces the gradients itself; under FSDP2 every process holds a shard of each parameter and the
    callback all-reduces the squared norms. Either way every number is the single process's, up to float32
    summation order (~1e-6 relative: the 16-sample mean is summed in two halves)."""
    single, distributed = single_process_history, distributed_history(tmp_path, 2, strategy)
    assert [r["step"] for r in distributed] == [0, 1, 2]
    for one, two in zip(single, distributed):
        assert two["global_norm"] == pytest.approx(one["global_norm"], rel=1e-5)
        assert list(two["layers"]) == list(one["layers"])
        for name, stats in one["layers"].items():
            for key in ("grad_norm", "weight_norm", "update_to_weight"):
                assert two["layers"][name][key] == pytest.approx(stats[key], rel=1e-5), (name, key)


def test_trains_from_the_cli_with_the_callback_appended_by_short_name(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stabilize.cli import StabilizeCLI

    monkeypatch.chdir(tmp_path)
    cli = StabilizeCLI(
        args=[
            "fit",
            "--model",
            "ResNet",
            "--model.depth=8",
            "--data",
            "CIFAR10DataModule",
            f"--data.data_dir={tiny_cifar}",
            "--data.val_size=40",
            "--data.batch_size=32",
            "--trainer.callbacks+=GradientHealthCallback",
            "--trainer.callbacks.on_nonfinite=skip",
            "--trainer.callbacks.log_every_n_steps=2",
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
        ]
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, GradientHealthCallback)]
    assert len(callbacks) == 1 and callbacks[0].on_nonfinite == "skip"
    assert [r["step"] for r in callbacks[0].history] == [0, 2]
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    assert "grad_health/global_norm" in events.Tags()["scalars"]


def test_the_same_callback_instance_serves_a_second_fit(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    first = TinyMLP()
    trainer(tmp_path, [health], steps=3).fit(first)
    second = TinyMLP()  # new parameters and a new optimizer
    trainer(tmp_path, [health], steps=3).fit(second)
    assert [r["step"] for r in health.history] == [0, 2, 0, 2]
    assert health.summary()["optimizer_0"]["steps"] == 6
    assert all("update_to_weight" in r["layers"]["head"] for r in health.history)  # step hook re-registered
    assert health._monitors[0].layers.params[0] is next(second.parameters())


def test_dead_relu_network_gets_the_remedy_that_fits(tmp_path: Path) -> None:
    model = TinyMLP()
    model.body[3] = torch.nn.Linear(16, 16)
    model.body[4] = torch.nn.ReLU()
    with torch.no_grad():
        model.body[3].bias.fill_(-100.0)  # the second ReLU is dead for every input
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    trainer(tmp_path, [health], steps=2).fit(model)
    report = health.diagnosis(model)
    assert "get exactly zero gradient: the ReLU units died" in report
    assert "sigmoid" not in report and "small fixed std" not in report
    assert set(health.history[-1]["vanishing_layers"]) == {"body.0", "body.1", "body.3"}


def test_flow_figure_marks_zero_and_nonfinite_layers_instead_of_dropping_them() -> None:
    import matplotlib.pyplot as plt

    figure = GradientHealthCallback().flow_figure(["a", "b", "c", "d"], [0.0, 1e-3, 0.5, float("nan")])
    axis = figure.axes[0]
    marked = {c.get_label(): [int(x) for x, _ in c.get_offsets()] for c in axis.collections if c.get_offsets().size}
    assert marked == {"exactly zero": [0], "non-finite": [3]}
    assert axis.get_yscale() == "log"
    plt.close(figure)


def test_events_counted_after_the_last_logging_step_survive_a_mid_run_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=10, warmup_steps=3, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    trainer(tmp_path, [health, saver], steps=8, enable_checkpointing=True).fit(TinyMLP(lr=1e-9, loss_scale_at={5: 1e6}))
    resumed = GradientHealthCallback(log_every_n_steps=10, warmup_steps=3, verbose=False)
    trainer(tmp_path, [resumed], steps=9).fit(TinyMLP(lr=1e-9), ckpt_path=tmp_path / "step=7.ckpt")
    spikes = resumed.summary()["optimizer_0"]["transient_spikes"]
    assert [(e["first_step"], e["steps"]) for e in spikes] == [(5, 1)]
    assert "1 transient spike" in resumed.diagnosis()


def test_figures_and_histograms_wait_their_minimum_wall_time(tmp_path: Path) -> None:
    health = GradientHealthCallback(
        log_every_n_steps=1, histogram_every_n_steps=2, figure_every_n_steps=2, verbose=False
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [health], steps=6, logger=logger).fit(TinyMLP())
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    events.Reload()
    # Steps 2 and 4 came within 60 s (10 s for histograms); the last logging step is always drawn.
    assert [e.step for e in events.Images("grad_health/flow")] == [0, 5]
    assert [e.step for e in events.Histograms("grad_hist/head")] == [0, 5]
    assert [e.step for e in events.Scalars("grad_norm/head")] == list(range(6))  # scalars every logging step
    assert [e.step for e in events.Scalars("update_to_weight/head")] == list(range(6))


def test_the_last_figure_is_the_fit_s_last_step_not_the_logging_step_before_it(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=5, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [health], steps=12, logger=logger).fit(TinyMLP())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    # Records at 0, 5, 10 and the last step, 11; step 10 is not the end of training and is not drawn as if it were.
    assert [r["step"] for r in health.history] == [0, 5, 10, 11]
    assert [e.step for e in events.Images("grad_health/flow")] == [0, 11]


def test_skip_also_restores_batchnorm_statistics_after_a_nan_forward_pass(tmp_path: Path) -> None:
    seed_everything(0)
    model = ResNet(depth=8, scheduler="constant")
    data = SyntheticImages(num=64, batch_size=16)

    class NaNForwardAt(GradientProbe):
        """Corrupts one batch at step 2, so the forward pass itself writes NaN into the running statistics."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                batch[0][0, 0, 0, 0] = float("nan")

    health = GradientHealthCallback(on_nonfinite="skip", verbose=False)
    with pytest.warns(UserWarning, match="skipped optimizer step 2"):
        trainer(tmp_path, [health, NaNForwardAt()], steps=4, limit_val_batches=0).fit(model, data)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    assert buffers and all(torch.isfinite(b).all() for b in buffers)
    assert all(torch.isfinite(p).all() for p in model.parameters())
