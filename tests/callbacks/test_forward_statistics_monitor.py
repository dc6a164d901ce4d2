from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from stabilize.callbacks import ForwardStatisticsMonitor
from stabilize.datamodules import CharTextDataModule
from stabilize.errors import ConfigurationError
from stabilize.health.forward_statistics import ForwardRecord, findings, read_statistics, residual_growth
from stabilize.models import ResNet, TransformerLM
from tests.helpers.trainer import quiet_trainer


def tiny(**kwargs) -> TransformerLM:
    return TransformerLM(**{"vocab_size": 11, "context": 8, "depth": 3, "width": 16, "heads": 2, **kwargs})


def measured(model: TransformerLM, tokens: torch.Tensor) -> dict[str, float]:
    model.train()
    model.record_forward_statistics = True
    model(tokens)
    model.record_forward_statistics = False
    return read_statistics(0, model.forward_statistics).values


def test_the_attention_logit_is_the_largest_causal_scaled_query_key_product() -> None:
    torch.manual_seed(0)
    model = tiny()
    tokens = torch.randint(0, 11, (4, 8))
    values = measured(model, tokens)
    assert sorted(values) == sorted(
        [*(f"block_rms/{i}" for i in range(3)), *(f"attention_logit_max/{i}" for i in range(3)), "output_logit_max"]
    )
    block = model.blocks[0]
    x = model.embed(tokens) + model.position(torch.arange(8))
    q, k, _ = block.qkv(block.norm1(x)).view(4, 8, 3, 2, 8).unbind(2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert values["attention_logit_max/0"] == pytest.approx(logits[..., causal].max().item(), rel=1e-5)
    assert values["output_logit_max"] == pytest.approx(model(tokens).abs().max().item(), rel=1e-5)
    # Queries and keys are linear in qkv's weights and biases: scaling both by 10 scales the logits by 100.
    with torch.no_grad():
        model.blocks[0].qkv.weight[:32].mul_(10)
        model.blocks[0].qkv.bias[:32].mul_(10)
    assert measured(model, tokens)["attention_logit_max/0"] == pytest.approx(
        100 * values["attention_logit_max/0"], rel=1e-4
    )


def test_nothing_is_measured_unless_asked_or_in_eval() -> None:
    model = tiny()
    model(torch.randint(0, 11, (2, 8)))
    assert model.forward_statistics == {}
    model.eval()
    model.record_forward_statistics = True
    model(torch.randint(0, 11, (2, 8)))
    assert model.forward_statistics == {}


def record(step: int, attention: list[float], output: float, rms: list[float]) -> ForwardRecord:
    values = {f"attention_logit_max/{i}": v for i, v in enumerate(attention)}
    values |= {f"block_rms/{i}": v for i, v in enumerate(rms)}
    return ForwardRecord(step, {**values, "output_logit_max": output})


def test_findings_name_the_layer_and_step_of_the_largest_value() -> None:
    healthy = [record(0, [0.5, 0.4], 3.0, [1.0, 1.5]), record(50, [12.0, 30.0], 25.0, [2.0, 6.0])]
    assert findings(healthy) == [] and residual_growth(healthy[-1]) == 3.0
    growing = [*healthy, record(100, [40.0, 2.5e3], 25.0, [2.0, 6.0]), record(150, [40.0, 1.5e3], 150.0, [2, 6])]
    attention, output = findings(growing)
    assert (attention.kind, attention.step, attention.layer, attention.value, attention.first) == (
        "attention_logits",
        100,
        1,
        2.5e3,
        0.4,
    )
    assert (output.kind, output.step, output.value) == ("output_logits", 150, 150.0)
    assert "layer 1 at step 100" in attention.sentence("qk_norm")


def test_a_tiny_transformer_run_logs_every_key_at_logging_steps_and_is_healthy(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh" * 300)
    seed_everything(0)
    data = CharTextDataModule(str(text), context=8, batch_size=8, train_batches=30, val_batches=1)
    model = TransformerLM(vocab_size=data.vocab_size, context=8, depth=2, width=32, heads=2, lr=3e-3)
    monitor = ForwardStatisticsMonitor(log_every_n_steps=10, verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[monitor], logger=logger)
    trainer.fit(model, data)
    assert [r.step for r in monitor.records] == [0, 10, 20]
    assert not model.record_forward_statistics and model.forward_statistics == {}
    logged = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"forward/attention_logit_max/1", "forward/block_rms/0", "forward/output_logit_max"} <= set(logged)
    assert monitor.diagnosis().startswith("Forward statistics healthy over 3 records: largest attention logit")
    resumed = ForwardStatisticsMonitor()
    resumed.load_state_dict(monitor.state_dict())  # a resumed run keeps the records its findings are judged on
    assert resumed.records == monitor.records


def test_a_module_without_forward_statistics_is_left_alone(tmp_path: Path, tiny_cifar: Path) -> None:
    from stabilize.datamodules import CIFAR10DataModule

    monitor = ForwardStatisticsMonitor(log_every_n_steps=1, verbose=False)
    data = CIFAR10DataModule(str(tiny_cifar), val_size=0, batch_size=50)
    quiet_trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(ResNet(depth=8), data)
    assert monitor.records == [] and monitor.diagnosis() == "Forward statistics: nothing measured."


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_the_interval_must_be_a_positive_integer(every: object) -> None:
    with pytest.raises(ConfigurationError, match="log_every_n_steps must be a positive integer or None"):
        ForwardStatisticsMonitor(log_every_n_steps=every)  # type: ignore[arg-type]
