from __future__ import annotations

import pytest
import torch

from stabilize.callbacks import GradientHealthCallback
from stabilize.datamodules import AddingProblemDataModule, CopyMemoryDataModule
from stabilize.health import verdict
from stabilize.models import RecurrentNet
from stabilize.models.recurrent import init_recurrent
from tests.helpers.trainer import quiet_trainer


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_every_cell_trains_on_the_adding_problem(cell: str, tmp_path) -> None:
    torch.manual_seed(0)
    data = AddingProblemDataModule(seq_len=20, batch_size=32, train_batches=6, val_size=64, test_size=64)
    model = RecurrentNet(cell=cell, hidden_size=16, lr=1e-2)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, data)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert model.recurrent_states is not None and model.recurrent_states.shape[-1] == 16


def test_identity_init_is_the_irnn_and_the_gain_scales_every_gate() -> None:
    torch.manual_seed(0)
    rnn = RecurrentNet(cell="rnn_relu", init="identity", recurrent_gain=1.5, hidden_size=8).network.layers[0]
    torch.testing.assert_close(rnn.weight_hh_l0, 1.5 * torch.eye(8))
    assert rnn.bias_hh_l0.abs().max() == 0 and rnn.weight_ih_l0.std() < 0.01
    lstm = torch.nn.LSTM(4, 8, batch_first=True)
    init_recurrent(lstm, "orthogonal", 1.0)
    for gate in lstm.weight_hh_l0.split(8):
        torch.testing.assert_close(gate @ gate.T, torch.eye(8), atol=1e-5, rtol=0)


def test_a_relu_rnn_with_a_large_recurrent_gain_is_flagged_exploding(tmp_path) -> None:
    torch.manual_seed(0)
    # The adding-problem IRNN of configs/study/rnn.yaml: gradient norms of 1e6-1e7 for a loss of 1e2-1e3.
    data = AddingProblemDataModule(seq_len=100, batch_size=32, train_batches=6, val_size=0, test_size=0)
    model = RecurrentNet(cell="rnn_relu", init="identity", recurrent_gain=1.1, hidden_size=32, lr=1e-4)
    health = GradientHealthCallback(log_every_n_steps=1, verbose=False)
    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[health]).fit(model, data)
    # Out of range from step 0 (no median yet): the gradient is over 1e3x the loss, 5 steps in a row.
    (explosion,) = health.summary()["optimizer_0"]["explosions"]
    assert explosion["rule"] == "ceiling" and explosion["first_step"] == 0, health.history[0]["global_norm"]
    assert "EXPLODING" in health.diagnosis(model)


def test_sequence_output_for_the_copy_task_and_bad_input_is_one_message() -> None:
    data = CopyMemoryDataModule(delay=5)
    x, _ = data.generate(4, torch.Generator().manual_seed(0))
    model = RecurrentNet(input_size=10, output_size=10, output="sequence", cell="gru", hidden_size=8)
    assert model(x).shape == (4, 25, 10)
    with pytest.raises(ValueError, match=r"expects float sequences of shape \(N, T, 10\)"):
        model(x[..., :3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cell": "transformer"}, "Unknown cell"),
        ({"init": "zeros"}, "Unknown init"),
        ({"output": "classification", "output_size": 1}, "at least 2 classes"),
        ({"recurrent_gain": 0.0}, "recurrent_gain"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RecurrentNet(**kwargs)


def test_the_gradient_over_time_is_recorded_where_the_states_carry_it(tmp_path) -> None:
    torch.manual_seed(0)
    # The copy task reads every step's state: the gradient by each state is the loss's own at that step.
    data = CopyMemoryDataModule(delay=5, batch_size=16, train_batches=3, val_size=0, test_size=0)
    model = RecurrentNet(input_size=10, output_size=10, output="sequence", cell="rnn_tanh", hidden_size=16)
    health = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[health]).fit(model, data)
    record = health.history[0]
    norms = record["temporal_grad_norms"]
    assert len(norms) == 25 and [r["step"] for r in health.history] == [0, 2]
    assert min(norms) > 0 and record["temporal_ratio"] == pytest.approx(norms[0] / norms[-1])
    assert "Temporal: the gradient at t=0 is" in health.diagnosis(model)


def test_a_last_step_readout_gives_no_temporal_ratio(tmp_path) -> None:
    # nn.RNN's output sequence is not on its recurrence path: read at the last step only, its gradient before the
    # last step is exactly zero whatever the network remembers, which measures nothing (not "credit lost").
    torch.manual_seed(0)
    data = AddingProblemDataModule(seq_len=60, batch_size=32, train_batches=3, val_size=0, test_size=0)
    model = RecurrentNet(cell="lstm", hidden_size=16)
    health = GradientHealthCallback(log_every_n_steps=2, verbose=False)
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[health]).fit(model, data)
    assert all("temporal_ratio" not in record for record in health.history)
    summary = health.summary()["optimizer_0"]
    assert summary["last_temporal_ratio"] is None and "through time" not in verdict(summary)


def test_the_temporal_figure_reaches_tensorboard(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = CopyMemoryDataModule(delay=5, batch_size=16, train_batches=2, val_size=0, test_size=0)
    health = GradientHealthCallback(log_every_n_steps=1, figure_every_n_steps=1, figure_min_interval_s=0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[health], logger=logger).fit(
        RecurrentNet(input_size=10, output_size=10, output="sequence", hidden_size=8), data
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "grad_health/temporal" in events.Tags()["images"]
    assert "grad_health/temporal_ratio" in events.Tags()["scalars"]
