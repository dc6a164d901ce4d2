"""``stabilize doctor`` end to end, and the config patch it writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from stabilize.doctor.command import config_patch, doctor_options
from stabilize.doctor.remedies import Remedy, reinitialisation
from stabilize.models import DeepPlainCNN, ResNet
from stabilize.models.variants import Variant
from tests.helpers.commands import stabilize_command

MODEL = ["--model", "tests.helpers.doctor_models.TeacherNet", "--model.bias", "-10", "--trainer.logger", "false"]


def test_stabilize_doctor_repairs_the_run_and_its_patch_applies(tmp_path: Path) -> None:
    out = tmp_path / "doctor"
    # One trial: the re-initialisation (the plan's first remedy for a ReLU net's vanishing), then the patch.
    options = ["--doctor.steps", "100", "--doctor.max_trials", "1", "--doctor.out", str(out)]
    result = stabilize_command("doctor", *MODEL, *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "probing TeacherNet for 100 steps (seed 42)" in result.stdout
    assert "Repaired by re-init auto" in result.stdout and "| re-init auto | healthy |" in result.stdout
    assert {p.name for p in out.iterdir()} == {"report.md", "loss.png", "fix.yaml"}
    patch = yaml.safe_load((out / "fix.yaml").read_text())
    assert patch["trainer"]["callbacks"][-1] == {
        "class_path": "stabilize.callbacks.Reinitialize",
        "init_args": {"scheme": "auto"},
    }
    # The patch on top of the same run: the re-initialisation happens in `stabilize fit`.
    applied = stabilize_command(
        "fit", *MODEL, "--config", str(out / "fix.yaml"), "--trainer.max_steps", "2", cwd=tmp_path
    )
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert "Reinitialize: 4 layers re-initialised (he)" in applied.stderr + applied.stdout


def test_doctor_options_are_split_from_the_run_s_arguments() -> None:
    options, rest = doctor_options(
        ["--config", "a.yaml", "--doctor.steps", "50", "--doctor.try_all", "--model.lr", "1"]
    )
    assert options.steps == 50 and options.try_all and options.max_trials == 8
    assert rest == ["--config", "a.yaml", "--model.lr", "1"]
    assert (options.monitor, options.mode) == (None, "min")
    monitored, _ = doctor_options(["--doctor.monitor", "val/acc", "--doctor.mode", "max"])
    assert (monitored.monitor, monitored.mode) == ("val/acc", "max")


def test_config_patch_keeps_the_run_s_callbacks_and_writes_whole_model_for_another_class() -> None:
    health = {"class_path": "stabilize.callbacks.GradientHealthCallback", "init_args": {"median_window": 64}}
    health["init_args"]["on_nonfinite"] = "skip"  # the one argument given; the dump writes the defaults too
    config = {"trainer": {"callbacks": [health]}}
    patch = config_patch(reinitialisation("he"), config, DeepPlainCNN())
    assert patch["trainer"]["callbacks"] == [
        {"class_path": "stabilize.callbacks.GradientHealthCallback", "init_args": {"on_nonfinite": "skip"}},
        {"class_path": "stabilize.callbacks.Reinitialize", "init_args": {"scheme": "he"}},
    ]
    plain = DeepPlainCNN(depth=20, init_scale=1.5, lr=0.01)
    residual = config_patch(Remedy("residual", "structure", variant=plain.stabilize_variants()["residual"]), {}, plain)
    assert residual["model"]["class_path"] == "stabilize.models.ResNet"
    arguments = residual["model"]["init_args"]
    assert "init_scale" not in arguments and arguments["lr"] == 0.01 and arguments["depth"] == 20
    ResNet(**arguments)  # the patch's arguments build the class it names
    same = config_patch(Remedy("n", "structure", variant=Variant("LayerNorm", {"norm": True})), {}, plain)
    assert same == {"model": {"init_args": {"norm": True}}}
