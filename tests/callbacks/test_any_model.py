"""GradientHealthCallback on models that are not ours: precisions, sparse and complex gradients, tied weights,
attention, adapters, alternating optimizers, closures, frozen groups, crashes, compiled submodules.

Norms are compared with ``torch.nn.utils.get_total_norm``/``vector_norm`` over the unique parameters, computed the
same way in the same precision: float32 results agree to ~1e-6 relative (a sum of at most a few thousand squares in
another order), float64 ones to ~1e-12.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stabilize.callbacks import GradientHealthCallback
from stabilize.health import verdict
from tests.callbacks.helpers import TinyMLP, fixed_data
from tests.helpers.trainer import quiet_trainer


class FirstGradients(Callback):
    """The unique parameters' gradient norm the optimizer sees at the first ``on_before_optimizer_step`` of each
    global step (an LBFGS step calls its closure, and so that hook, several times)."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step in self.norms:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        self.norms[trainer.global_step] = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in dense])
        ).item()


def fit(tmp_path: Path, model: LightningModule, steps: int, callbacks: list, **kwargs) -> Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=callbacks, **kwargs)
    trainer.fit(model)
    return trainer


def only(health: GradientHealthCallback) -> dict:
    """The summary of the run's one optimizer."""
    (summary,) = health.summary().values()
    return dict(summary)


def assert_norms_match(health: GradientHealthCallback, probe: FirstGradients, rel: float) -> None:
    assert health.history, "no record"
    for record in health.history:
        assert record["global_norm"] == pytest.approx(probe.norms[record["step"]], rel=rel)


# ----------------------------------------------------------------------------------------- models of the tests
def token_data(num: int = 64, length: int = 8, vocab: int = 20, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (num, length + 1), generator=generator)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class TinyLM(LightningModule):
    """A Hugging-Face-style decoder block: tied input/output embeddings, LayerNorm, GELU, multi-head attention
    (whose ``out_proj`` is used functionally, never called)."""

    def __init__(self, vocab: int = 20, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.norm(x))
        return self.lm_head(x)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_data(), batch_size=16)


class SparseEmbedding(LightningModule):
    """Sparse embedding gradients, SparseAdam: the batch repeats tokens, so the gradient is uncoalesced."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=True)
        self.register_buffer("target", torch.randn(8, generator=torch.Generator().manual_seed(1)))

    def training_step(self, batch, batch_idx):
        return (self.embed(batch[0]) - self.target).square().mean()

    def configure_optimizers(self):
        return torch.optim.SparseAdam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_data(), batch_size=16)


class ComplexFilter(LightningModule):
    """A complex-valued linear map fitted to a complex target (real loss |error|^2)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat, generator=generator))
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = torch.complex(batch[0], batch[0].flip(-1))
        return (self.head((x @ self.weight).abs()).squeeze(-1) - batch[1]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 4, generator=generator), torch.randn(64, generator=generator)))


# ------------------------------------------------------------------------------------------- precision, kinds
@pytest.mark.parametrize("how", ["precision", "double"])
def test_float64_norms_are_computed_in_float64(tmp_path: Path, how: str) -> None:
    seed_everything(0)
    health, probe = GradientHealthCallback(log_every_n_steps=1, verbose=False), FirstGradients()
    model = TinyMLP()
    kwargs = {"precision": "64-true"} if how == "precision" else {}
    if how == "double":
        model = model.double()
        x, y = fixed_data().tensors
        model.train_dataloader = lambda: DataLoader(TensorDataset(x.double(), y), batch_size=8)  # type: ignore
    fit(tmp_path, model, 4, [health, probe], **kwargs)
    assert_norms_match(health, probe, rel=1e-12)


def histogram_tags(logger: TensorBoardLogger) -> list[str]:
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    return events.Tags()["histograms"]


def every_step_histograms() -> GradientHealthCallback:
    return GradientHealthCallback(
        log_every_n_steps=1, histogram_every_n_steps=1, histogram_min_interval_s=0, on_nonfinite="skip", verbose=False
    )


def test_complex_parameters_count_their_modulus(tmp_path: Path) -> None:
    health, probe = every_step_histograms(), FirstGradients()
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, ComplexFilter(), 4, [health, probe], logger=logger)
    assert_norms_match(health, probe, rel=1e-6)
    assert "grad_hist/(root)" in histogram_tags(logger)
    assert set(health.history[0]["layers"]) == {"(root)", "head"}


def test_sparse_gradients_are_measured_by_their_coalesced_values(tmp_path: Path) -> None:
    health, probe = every_step_histograms(), FirstGradients()
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, SparseEmbedding(), 4, [health, probe], logger=logger)
    assert_norms_match(health, probe, rel=1e-6)
    assert histogram_tags(logger) == ["grad_hist/embed", "grad_log10/embed"]
    assert health.history[-1]["layers"]["embed"]["update_to_weight"] > 0


def test_lazy_modules_with_skip_snapshot_their_buffers_once_materialised(tmp_path: Path) -> None:
    class Lazy(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(16, 16))

    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=1, on_nonfinite="skip", verbose=False)
    fit(tmp_path, Lazy(), 4, [health])  # materialised by the first training batch
    assert only(health)["steps"] == 4 and "body.1" in health.history[0]["layers"]


# ----------------------------------------------------------------------------------- which parameters, which order
def test_tied_weights_are_counted_once_and_named_after_their_first_owner(tmp_path: Path) -> None:
    seed_everything(0)
    health, probe = GradientHealthCallback(log_every_n_steps=1, verbose=False), FirstGradients()
    model = TinyLM()
    fit(tmp_path, model, 3, [health, probe])
    assert_norms_match(health, probe, rel=1e-6)
    for step, norm in probe.norms.items():
        assert norm != 0 and step in {r["step"] for r in health.history}
    layers = list(health.history[0]["layers"])
    assert "lm_head" not in layers and layers.count("embed") == 1
    assert only(health)["shared_parameters"] == {"embed.weight": ["lm_head.weight"]}
    assert "lm_head.weight is embed.weight" in health.diagnosis()


def test_a_functionally_used_submodule_follows_its_parent_in_forward_order(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path, TinyLM(), 2, [health])
    assert list(health.history[0]["layers"]) == ["embed", "attn", "attn.out_proj", "norm", "mlp.0", "mlp.2"]


def test_get_total_norm_agrees_on_lightnings_boring_model(tmp_path: Path) -> None:
    health, probe = GradientHealthCallback(log_every_n_steps=1, verbose=False), FirstGradients()
    fit(tmp_path, BoringModel(), 3, [health, probe])
    assert_norms_match(health, probe, rel=1e-6)
    assert only(health)["num_layers"] == 1  # one Linear: weight and bias are one layer


class LoRA(LightningModule):
    """A frozen two-layer base with a zero-initialised low-rank adapter (``B = 0``): ``A``'s gradient is exactly
    zero until ``B`` has taken its first step."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(6, 4, bias=False)
        self.lora_B = nn.Linear(4, 32, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = F.relu(self.base[0](x) + self.lora_B(self.lora_A(x)))
        return F.cross_entropy(self.base[2](hidden), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return TinyMLP().train_dataloader()


def test_zero_initialised_adapters_are_not_vanishing_once_they_learn(tmp_path: Path) -> None:
    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path, LoRA(), 40, [health])
    first = health.history[0]["layers"]
    assert first["lora_A"]["grad_norm"] == 0.0 and first["lora_B"]["grad_norm"] > 0  # the premise
    summary = only(health)
    assert summary["ever_vanished"] == {} and summary["vanishing_layers_now"] == {}
    assert summary["worst_depth_ratio"]["ratio"] > 1e-3
    assert verdict(summary) == "healthy"


# ---------------------------------------------------------------------------------------- optimizers and steps
class Alternating(TinyMLP):
    """Two optimizers stepping on alternate batches (manual optimization), as a GAN's critic and generator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()[batch_idx % 2]
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        optimizer.step()
        optimizer.zero_grad()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1))


def test_alternating_optimizers_each_get_histograms_and_figures(tmp_path: Path) -> None:
    health = GradientHealthCallback(
        log_every_n_steps=1,
        histogram_every_n_steps=2,
        figure_every_n_steps=2,
        histogram_min_interval_s=0,
        figure_min_interval_s=0,
        verbose=False,
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, Alternating(), 8, [health], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"grad_hist/body/body.0", "grad_hist/head/head"} <= set(tags["histograms"])
    assert {"grad_health/body/flow", "grad_health/head/flow"} <= set(tags["images"])
    # Each optimizer steps 4 times: histograms at its own steps 0 and 2.
    assert len(events.Histograms("grad_hist/head/head")) == 2


class Quadratic(LightningModule):
    """Least squares with LBFGS: each step calls its closure several times."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        return (self.layer(batch[0]).squeeze(-1) - batch[0].sum(-1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)

    def train_dataloader(self) -> DataLoader:
        return TinyMLP().train_dataloader()


def test_a_closure_optimizer_is_one_step_per_optimizer_step(tmp_path: Path) -> None:
    class CountClosures(Callback):
        calls = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            CountClosures.calls += 1

    health, probe = GradientHealthCallback(log_every_n_steps=1, verbose=False), FirstGradients()
    fit(tmp_path, Quadratic(), 6, [health, probe, CountClosures()])
    assert CountClosures.calls > 6  # the premise: LBFGS evaluated its closure more often than it stepped
    summary = only(health)
    assert summary["steps"] == 6 and [r["step"] for r in health.history] == list(range(6))
    assert_norms_match(health, probe, rel=1e-6)  # the gradient at the step's starting point
    assert summary["explosions"] == [] and summary["transient_spikes"] == []


class FrozenAndUnused(TinyMLP):
    """The head's group has lr=0 and ``spare`` is never used by the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(16, 16)

    def configure_optimizers(self):
        learning = [*self.body.parameters(), *self.spare.parameters()]
        return torch.optim.SGD([{"params": learning}, {"params": self.head.parameters(), "lr": 0}], lr=0.1)


def test_zero_learning_rate_groups_and_layers_without_gradient_are_named(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path, FrozenAndUnused(), 4, [health])
    summary = only(health)
    assert summary["zero_lr_layers"] == ["head"] and summary["never_gradient_layers"] == ["spare"]
    diagnosis = health.diagnosis()
    assert "learning rate 0: head" in diagnosis and "never received a gradient: spare" in diagnosis


# --------------------------------------------------------------------------------------------- when things fail
class CrashAt(TinyMLP):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.crash_step = step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_step:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("crash_step", [0, 5])
def test_a_crashed_run_gets_a_partial_diagnosis_never_healthy(
    tmp_path: Path, crash_step: int, caplog: pytest.LogCaptureFixture
) -> None:
    health = GradientHealthCallback(log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"), caplog.at_level("INFO"):
        fit(tmp_path, CrashAt(crash_step), 10, [health])
    text = health.diagnosis()
    assert f"stopped by RuntimeError after {crash_step} optimizer steps" in text
    assert "Healthy" not in text
    if crash_step:
        assert verdict(only(health)).startswith("stopped by RuntimeError after 5 steps (partial")
    assert "stopped by RuntimeError" in caplog.text


def test_nonfinite_warnings_are_collapsed_once_the_weights_are_nan(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="non-finite") as warned:
        fit(tmp_path, TinyMLP(loss_scale_at={2: math.nan}), 20, [health])
    ours = [w for w in warned if "GradientHealthCallback" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "not warned about again" in str(ours[0].message)
    assert len(only(health)["nonfinite"]) == 18  # one event per logging step from step 2 to 19: all still listed


def test_compiled_submodules_keep_the_uncompiled_keys(tmp_path: Path) -> None:
    plain = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path / "plain", TinyMLP(), 2, [plain])
    compiled_model = TinyMLP()
    compiled_model.body = torch.compile(compiled_model.body, backend="eager")  # type: ignore[assignment]
    compiled = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path / "compiled", compiled_model, 2, [compiled])
    assert set(compiled.history[0]["layers"]) == set(plain.history[0]["layers"])


class StillAlternating(Alternating):
    """Alternating optimizers at an LR that moves nothing: both losses stay where they started."""

    def configure_optimizers(self):
        return (torch.optim.SGD(self.body.parameters(), lr=1e-9), torch.optim.SGD(self.head.parameters(), lr=1e-9))


def test_a_loss_that_never_falls_is_a_stall_but_only_with_one_optimizer(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path, TinyMLP(lr=1e-9), 40, [health])  # 40 records, the weights move by ~1e-9
    assert only(health)["loss_stall"] is not None
    assert verdict(only(health)).startswith("loss stalled") and "STALLED" in health.diagnosis()
    # Two optimizers: each network's loss may hover by design (a GAN's discriminator), so neither is judged.
    two = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    fit(tmp_path, StillAlternating(), 80, [two])
    assert all(summary["loss_stall"] is None for summary in two.summary().values())
    assert "STALLED" not in two.diagnosis()
