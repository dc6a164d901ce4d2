from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from stabilize.cli import main
from stabilize.errors import ConfigurationError
from stabilize.study import Budget, load_grid, run_study

REPO = Path(__file__).resolve().parents[2]
TINY = Budget(max_epochs=2, train_subset=None, val_size=40, batch_size=32, log_every_n_steps=2)

TWO_RUNS = """
name: tiny
description: two small nets
defaults:
  model:
    init_args: {depth: 8, lr: 0.05}
budgets:
  tiny: {max_epochs: 2, train_subset: null, val_size: 40, batch_size: 32, log_every_n_steps: 2}
runs:
  - name: plain
    model: {class_path: DeepPlainCNN, init_args: {activation: sigmoid, init: small_normal}}
  - name: resnet
    model: {class_path: stabilize.models.ResNet}
"""


def write_grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_two_run_grid_writes_the_report_and_is_not_trained_twice(tiny_cifar: Path, tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, TWO_RUNS))
    out = tmp_path / "out"
    lines: list[str] = []
    results = run_study(grid, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=lines.append)
    assert [r["name"] for r in results] == ["plain", "resnet"]
    assert lines[0].startswith("run 1/2 plain: test accuracy") and lines[1].startswith("run 2/2 resnet:")
    report = (out / "report.md").read_text()
    assert "| plain |" in report and "| resnet |" in report and "![gradient flow](gradient_flow.png)" in report
    for name in ("curves.png", "gradient_flow.png", "global_norm.png", "results.json", "results.csv"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved[1]["steps"] == 10 and 0.0 <= saved[1]["test_acc"] <= 1.0  # 2 epochs x 5 batches of 32
    assert saved[0]["curves"]["final_layers"][0] == "network.0.0"  # forward order, input first
    with open(out / "results.csv", newline="") as file:
        assert [row["name"] for row in csv.DictReader(file)] == ["plain", "resnet"]
    config = (out / "resnet" / "config.yaml").read_text()
    assert "stabilize.models.resnet.ResNet" in config and "depth: 8" in config and "zero_init_residual" in config
    assert list((out / "resnet").glob("events.out.tfevents.*"))  # TensorBoard names the run "resnet"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "resnet")).Reload().Tags()["scalars"]
    assert scalars and "hp_metric" not in scalars  # the run's metrics, without Lightning's empty placeholder

    # A rerun trains nothing and judges each run's saved gradient records again under the current rules: a verdict
    # saved by older rules is replaced (and saved), one that still holds is kept.
    stale = json.loads((out / "resnet" / "result.json").read_text())
    (out / "resnet" / "result.json").write_text(json.dumps({**stale, "verdict": "an older rule's verdict"}))
    again: list[str] = []
    rerun = run_study(grid, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=again.append)
    assert all("finished earlier" in line for line in [again[0], again[1]])
    assert again[2] == f"  verdict under the current rules: {results[1]['verdict']} (was: an older rule's verdict)"
    assert [r["verdict"] for r in rerun] == [r["verdict"] for r in results]
    assert json.loads((out / "resnet" / "result.json").read_text())["verdict"] == results[1]["verdict"]


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ("{class_path: NoSuchNet}", r"run 'bad'.*unknown class 'NoSuchNet'"),
        ("{class_path: ResNet, init_args: {depth: 21}}", r"run 'bad'.*depth 6n\+2"),
        ("{class_path: ResNet, init_args: {colour: red}}", r"run 'bad'.*colour"),
    ],
)
def test_a_bad_entry_fails_before_anything_trains(run: str, message: str, tiny_cifar: Path, tmp_path: Path) -> None:
    text = TWO_RUNS + f"  - name: bad\n    model: {run}\n"
    out = tmp_path / "out"

    def load_and_run() -> None:
        grid = load_grid(write_grid(tmp_path, text))
        run_study(grid, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=lambda line: None)

    with pytest.raises(ConfigurationError, match=message):
        load_and_run()
    assert not (out / "plain").exists()


def test_unknown_budget_exits_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", str(write_grid(tmp_path, TWO_RUNS)), "--budget", "huge", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "Unknown budget 'huge'" in capsys.readouterr().err


def test_a_budget_names_its_runs_and_runs_picks_by_name_or_pattern(tmp_path: Path) -> None:
    text = TWO_RUNS.replace("budgets:\n", "budgets:\n  only-resnet: {max_epochs: 9, runs: [resnet]}\n")
    grid = load_grid(write_grid(tmp_path, text))
    assert grid.budget("only-resnet").runs == ("resnet",) and grid.budget("tiny").runs is None
    assert [run.name for run in grid.select(grid.budget("only-resnet").runs).runs] == ["resnet"]
    assert [run.name for run in grid.select(["*"]).runs] == ["plain", "resnet"]  # the grid's order
    assert [run.name for run in grid.select(["res*", "plain"]).runs] == ["plain", "resnet"]
    assert grid.select(None) is grid
    with pytest.raises(ConfigurationError, match="no run matching 'resnt'; did you mean resnet"):
        grid.select(["resnt"])


def test_a_budget_sets_model_data_and_trainer_arguments_under_each_runs_own(tmp_path: Path) -> None:
    budget = (
        "  gpuish: {model: {channels_last: true, depth: 20}, data: {device: cuda}, trainer: {precision: bf16-mixed}}"
    )
    grid = load_grid(write_grid(tmp_path, TWO_RUNS.replace("budgets:\n", f"budgets:\n{budget}\n")))
    runs, _ = grid.at_budget("gpuish")
    for run in runs.runs:
        assert run.model_args["channels_last"] is True and run.model_args["depth"] == 8  # the grid's depth wins
        assert run.data_args == {"device": "cuda"} and run.trainer_args == {"precision": "bf16-mixed"}
    assert [run.name for run in grid.at_budget("gpuish", ["res*"])[0].runs] == ["resnet"]
    with pytest.raises(ConfigurationError, match="budget 'bad': trainer must be a mapping"):
        load_grid(write_grid(tmp_path, TWO_RUNS.replace("budgets:\n", "budgets:\n  bad: {trainer: [1]}\n")))


@pytest.mark.parametrize(
    ("runs", "message"),
    [("[resnt]", "budget 'medium': grid 'tiny' has no run matching 'resnt'"), ("resnet", "must be a non-empty list")],
)
def test_a_budget_naming_runs_that_do_not_exist_fails_on_load(tmp_path: Path, runs: str, message: str) -> None:
    text = TWO_RUNS.replace("budgets:\n", f"budgets:\n  medium: {{runs: {runs}}}\n")
    with pytest.raises(ConfigurationError, match=message):
        load_grid(write_grid(tmp_path, text))


def test_a_misspelt_run_on_the_command_line_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = str(write_grid(tmp_path, TWO_RUNS))
    with pytest.raises(SystemExit) as exit_info:
        main(["study", grid, "--budget", "tiny", "--runs", "plain,resnt", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "no run matching 'resnt'; did you mean resnet?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_smoke_grid_runs_every_run_for_three_batches(tiny_cifar: Path, tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, TWO_RUNS)).smoke("tiny")
    budget = grid.budget("tiny")
    assert (budget.max_epochs, budget.train_subset, budget.log_every_n_steps) == (1, None, 1)
    results = run_study(grid, "tiny", tmp_path / "out", data_dir=str(tiny_cifar), accelerator="cpu", echo=print)
    assert [result["steps"] for result in results] == [3, 3]


def test_the_quickstart_grid_runs_end_to_end_on_tiny_data(tiny_cifar: Path, tmp_path: Path) -> None:
    grid = load_grid(REPO / "configs" / "study" / "quickstart.yaml")
    grid = dataclasses.replace(grid, budgets={"cpu-small": TINY})
    lines: list[str] = []
    results = run_study(grid, "cpu-small", tmp_path, data_dir=str(tiny_cifar), accelerator="cpu", echo=lines.append)
    assert [r["name"] for r in results] == ["plain-20-sigmoid", "batchnorm-20-sigmoid", "resnet-20-sigmoid"]
    assert results[0]["verdict"].startswith("vanishing") and results[0]["vanishing_layers_end"] >= 10
    assert results[1]["verdict"] == "healthy" and results[2]["verdict"] == "healthy"
    assert "gradient-flow plot" in lines[-2]


@pytest.mark.parametrize("grid", sorted((REPO / "configs" / "study").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_loads_and_its_runs_build(grid: Path, tiny_cifar: Path) -> None:
    from stabilize.study.grid import check_runs

    loaded = load_grid(grid)
    check_runs(loaded, dataclasses.replace(TINY), str(tiny_cifar))
    assert loaded.budget("cpu-small").max_epochs >= 1 and loaded.budget("full").train_subset is None


def test_a_recurrent_grid_with_a_clipping_callback_runs_on_synthetic_data(tmp_path: Path) -> None:
    text = """
name: tiny-rnn
defaults:
  model: {class_path: RecurrentNet, init_args: {hidden_size: 8}}
  data: {class_path: AddingProblemDataModule, init_args: {seq_len: 10, train_batches: 3, test_size: 64}}
budgets:
  tiny: {max_epochs: 1, train_subset: null, val_size: 64, batch_size: 16, log_every_n_steps: 1}
runs:
  - name: irnn-autoclip
    model: {init_args: {cell: rnn_relu, init: identity, recurrent_gain: 1.2}}
    callbacks: [{class_path: GradientClipping, init_args: {method: autoclip}}]
"""
    grid = load_grid(write_grid(tmp_path, text))
    results = run_study(grid, "tiny", tmp_path / "out", accelerator="cpu", echo=lambda line: None)
    assert results[0]["steps"] == 3 and results[0]["test_acc"] is None and results[0]["test_loss"] > 0
    config = (tmp_path / "out" / "irnn-autoclip" / "config.yaml").read_text()
    assert "stabilize.callbacks.gradient_clipping.GradientClipping" in config and "method: autoclip" in config


def test_a_study_killed_mid_run_continues_that_run_exactly_on_rerun(tiny_cifar: Path, tmp_path: Path) -> None:
    """SIGTERM in run 2 (a preempted job): its checkpoint is written, the rerun reuses run 1 and continues run 2
    from step 3, and every curve and the verdict equal those of a study never interrupted."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from tests.helpers.signals import SignalAtStep

    grid = load_grid(write_grid(tmp_path, TWO_RUNS))
    reference = run_study(grid, "tiny", tmp_path / "reference", data_dir=str(tiny_cifar), accelerator="cpu")

    killed_run = dataclasses.replace(
        grid.runs[1], callbacks=[(SignalAtStep, {"step": 3, "signum": int(signal.SIGTERM)})]
    )
    killed_grid = dataclasses.replace(grid, runs=[grid.runs[0], killed_run])
    out = tmp_path / "out"
    with pytest.raises(SIGTERMException):
        run_study(killed_grid, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=lambda line: None)
    assert (out / "resnet" / "interrupted.ckpt").is_file() and not (out / "resnet" / "result.json").exists()

    lines: list[str] = []
    results = run_study(grid, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=lines.append)
    assert "finished earlier" in lines[0] and "continuing from" in lines[1]
    assert not (out / "resnet" / "interrupted.ckpt").exists()  # the result is the record now
    for key in ("steps", "test_acc", "final_train_loss", "verdict", "median_grad_norm"):
        assert results[1][key] == reference[1][key], key
    assert results[1]["curves"]["train_loss"] == reference[1]["curves"]["train_loss"]


def test_a_run_killed_without_a_checkpoint_starts_over_with_its_old_logs_moved_aside(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    grid = load_grid(write_grid(tmp_path, TWO_RUNS))
    out = tmp_path / "out"
    stale = out / "plain"
    stale.mkdir(parents=True)
    (stale / "events.out.tfevents.0.partial").write_bytes(b"")  # a SIGKILLed attempt's log
    one_run = dataclasses.replace(grid, runs=grid.runs[:1])
    run_study(one_run, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=lambda line: None)
    assert (out / "plain" / "abandoned-1" / "events.out.tfevents.0.partial").is_file()
    assert not (out / "plain" / "events.out.tfevents.0.partial").exists()
    assert list((out / "plain").glob("events.out.tfevents.*"))  # the new attempt's own log


class BrokenCallbackError(Exception):
    pass


class FailsAtFirstBatch(Callback):
    def on_train_batch_start(self, *args: object) -> None:
        raise BrokenCallbackError("a bug")


def test_a_run_that_fails_leaves_no_half_made_folder(tiny_cifar: Path, tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, TWO_RUNS))
    failing = dataclasses.replace(grid, runs=[dataclasses.replace(grid.runs[0], callbacks=[(FailsAtFirstBatch, {})])])
    out = tmp_path / "out"
    with pytest.raises(BrokenCallbackError):
        run_study(failing, "tiny", out, data_dir=str(tiny_cifar), accelerator="cpu", echo=lambda line: None)
    assert not (out / "plain").exists()


def test_a_language_model_grid_runs_without_a_test_split(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh" * 300)
    grid_text = f"""
name: tiny-lm
defaults:
  model:
    class_path: TransformerLM
    init_args: {{vocab_size: 8, context: 8, depth: 1, width: 16, heads: 2}}
  data:
    class_path: CharTextDataModule
    init_args: {{path: {text}, context: 8, batch_size: 4, train_batches: 6, val_batches: 1}}
  callbacks: [{{class_path: ForwardStatisticsMonitor, init_args: {{log_every_n_steps: 3, verbose: false}}}}]
budgets:
  tiny: {{max_epochs: 1, train_subset: null, val_size: 0, log_every_n_steps: 3}}
runs:
  - name: low
    model: {{init_args: {{lr: 0.001}}}}
  - name: high
    model: {{init_args: {{lr: 0.01}}}}
"""
    lines: list[str] = []
    grid = load_grid(write_grid(tmp_path, grid_text))
    results = run_study(grid, "tiny", tmp_path / "out", accelerator="cpu", echo=lines.append)
    assert all(r["test_acc"] is None and r["test_loss"] is None and r["val_loss"] > 0 for r in results)
    assert all(r["diagnoses"]["ForwardStatisticsMonitor"].startswith("Forward statistics healthy") for r in results)
    assert [r["model_args"]["lr"] for r in results] == [0.001, 0.01]
    assert any(line.startswith("run 2/2 high: validation loss") for line in lines)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| run | val loss | train loss |" in report and "lr_sensitivity.png" in report
    assert "- high, ForwardStatisticsMonitor: Forward statistics healthy" in report
    assert (tmp_path / "out" / "lr_sensitivity.png").is_file()
