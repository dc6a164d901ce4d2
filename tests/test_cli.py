from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import stabilize
from stabilize.cli import DEFAULT_SEED, StabilizeCLI, main
from tests.helpers.commands import stabilize_command

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def tiny_data_args(tiny_cifar: Path) -> list[str]:
    return [
        "--data",
        "CIFAR10DataModule",
        f"--data.data_dir={tiny_cifar}",
        "--data.val_size=40",
        "--data.batch_size=16",
    ]


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("PlainCNN", []),
        ("DeepPlainCNN", ["--model.depth=8", "--model.activation=sigmoid"]),
        ("BatchNormCNN", ["--model.depth=8", "--model.norm=group"]),
        ("ResNet", ["--model.depth=8", "--model.preact=true"]),
        ("FixupResNet", ["--model.depth=8"]),
    ],
)
def test_fast_dev_run_of_every_variant_through_the_console_script(
    model: str, options: list[str], tiny_cifar: Path, tmp_path: Path
) -> None:
    result = stabilize_command("fit", "--model", model, *options, *tiny_data_args(tiny_cifar), *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in result.stderr + result.stdout


def test_user_subclass_trains_through_the_cli(tiny_cifar: Path, tmp_path: Path) -> None:
    (tmp_path / "my_research.py").write_text(
        "from torch import nn\n"
        "from stabilize.models import ImageClassifier\n\n"
        "class TinyNet(ImageClassifier):\n"
        "    def __init__(self, hidden: int = 8, **kwargs):\n"
        "        super().__init__(**kwargs)\n\n"
        "    def build_network(self):\n"
        "        h = self.hparams.hidden\n"
        "        return nn.Sequential(nn.Conv2d(3, h, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                             nn.Linear(h, self.hparams.num_classes))\n"
    )
    result = stabilize_command(
        "fit",
        "--model",
        "my_research.TinyNet",
        "--model.hidden=4",
        "--model.lr=0.01",
        *tiny_data_args(tiny_cifar),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.enable_progress_bar=false",
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list((tmp_path / "lightning_logs").glob("version_0/checkpoints/*.ckpt"))
    assert len(checkpoints) == 1
    hparams = torch.load(checkpoints[0], weights_only=False)["hyper_parameters"]
    assert hparams["hidden"] == 4 and hparams["lr"] == 0.01


def test_config_file_run_then_validate_and_test_from_its_checkpoint(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stabilize fit --config`` logs to TensorBoard by default; validate/test reload the checkpoint."""
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "resnet20.yaml"),
            "--model.depth=8",
            *tiny_data_args(tiny_cifar),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    version = tmp_path / "lightning_logs" / "version_0"
    assert list(version.glob("events.out.tfevents.*")), "TensorBoard is the default logger"
    assert (version / "config.yaml").is_file()
    checkpoint = next(version.glob("checkpoints/*.ckpt"))
    for subcommand in ("validate", "test"):
        main(
            [
                subcommand,
                "--model",
                "ResNet",
                "--model.depth=8",
                *tiny_data_args(tiny_cifar),
                f"--ckpt_path={checkpoint}",
                "--trainer.enable_progress_bar=false",
            ]
        )
    # Each run logs (and saves its config) into a version of its own.
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1", "version_2"]


def test_default_logger_is_tensorboard_and_everything_is_seeded(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = StabilizeCLI(args=["--model", "ResNet", "--model.depth=8", *tiny_data_args(tiny_cifar)], run=False)
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert cli.config.seed_everything == DEFAULT_SEED


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses_and_builds(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data_dir = ["--data.data_dir", str(tmp_path)] if "CIFAR10DataModule" in config.read_text() else []
    cli = StabilizeCLI(args=["--config", str(config), *data_dir], run=False)
    assert cli.model.__class__.__module__.startswith("stabilize.models")
    assert (cli.trainer.max_epochs or 0) >= 1 or cli.trainer.max_steps > 0
    from stabilize.callbacks import GradientHealthCallback, InterruptCheckpoint

    health = [c for c in cli.trainer.callbacks if isinstance(c, GradientHealthCallback)]
    assert len(health) == 1, "every experiment config attaches GradientHealthCallback"
    interval = health[0].log_every_n_steps or cli.trainer.log_every_n_steps
    assert cli.trainer.max_steps > 2 * interval or (cli.trainer.max_epochs or 0) >= 1  # more than one record
    assert any(isinstance(c, InterruptCheckpoint) for c in cli.trainer.callbacks)
    from lightning.pytorch.callbacks import ModelCheckpoint

    # A checkpoint by a validation metric is saved after validation, never at a train epoch's end where a run
    # stopped early (--trainer.max_steps) would warn that the key is missing.
    by_metric = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    assert all(c._save_on_train_epoch_end is False for c in by_metric if c.monitor.startswith("val/"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "NoSuchModel"], "NoSuchModel"),
        (["--model", "ResNet", "--model.depth", "abc"], "--model.depth: ResNet expects int, got 'abc'."),
        (["--model", "ResNet", "--model.depth", "22"], r"depth 6n+2 (20, 32, 44, 56, 110, ...); got 22"),
        (["--model", "ResNet", "--model.activation", "swish"], "ResNet expects typing.Literal['relu', "),
        (["--model", "ResNet", "--data", "CIFAR10DataModule", "--data.val_size", "-5"], "val_size must be"),
    ],
)
def test_bad_arguments_exit_with_a_message_not_a_traceback(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_print_config_and_module_entry_point(tmp_path: Path) -> None:
    result = stabilize_command(
        "fit", "--model", "ResNet", "--model.depth=56", "--data", "CIFAR10DataModule", "--print_config", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: stabilize.models.ResNet" in result.stdout
    assert "depth: 56" in result.stdout
    assert "seed_everything: 42" in result.stdout


@pytest.fixture(scope="module")
def python_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-8 checkpoint saved from Python (no class path among its hyperparameters)."""
    from stabilize.models import ResNet
    from tests.helpers.data import SyntheticImages
    from tests.helpers.trainer import quiet_trainer

    folder = tmp_path_factory.mktemp("ckpt")
    trainer = quiet_trainer(folder, max_steps=1, limit_val_batches=0)
    trainer.fit(ResNet(depth=8, scheduler="constant"), SyntheticImages(num=16, batch_size=8))
    trainer.save_checkpoint(folder / "resnet8.ckpt")
    return folder / "resnet8.ckpt"


def test_test_from_a_checkpoint_saved_in_python(python_checkpoint: Path, tiny_cifar: Path, tmp_path: Path) -> None:
    result = stabilize_command(
        "test", "--model", "ResNet", *tiny_data_args(tiny_cifar), f"--ckpt_path={python_checkpoint}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout + result.stderr


def test_checkpoint_of_another_model_class_is_refused_by_name(
    python_checkpoint: Path, tiny_cifar: Path, tmp_path: Path
) -> None:
    result = stabilize_command(
        "test", "--model", "FixupResNet", *tiny_data_args(tiny_cifar), f"--ckpt_path={python_checkpoint}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "do not fit FixupResNet" in result.stderr and "Traceback" not in result.stderr


def test_missing_data_is_one_message_not_a_traceback(tmp_path: Path) -> None:
    result = stabilize_command(
        "fit", "--model=ResNet", "--data=CIFAR10DataModule", f"--data.data_dir={tmp_path / 'nowhere'}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "CIFAR-10 not found" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("(set STABILIZE_DEBUG=1")
    # Found missing while the Trainer prepares the data, before it creates the run's folder: none is left behind,
    # and no "partial" gradient report of a run that took no step.
    assert not (tmp_path / "lightning_logs").exists() and "Gradient health" not in result.stderr + result.stdout


def test_python_m_stabilize_names_itself_stabilize(tmp_path: Path) -> None:
    result = stabilize_command("--help", cwd=tmp_path)
    assert result.stdout.startswith("usage: stabilize")


def test_checkpoint_naming_its_class_refuses_a_different_model(
    python_checkpoint: Path, tiny_cifar: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(python_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "stabilize.models.resnet.ResNet"  # as LightningCLI saves it
    torch.save(checkpoint, tmp_path / "cli.ckpt")
    result = stabilize_command(
        "test",
        "--model",
        "FixupResNet",
        *tiny_data_args(tiny_cifar),
        f"--ckpt_path={tmp_path / 'cli.ckpt'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "holds a ResNet, but --model is FixupResNet" in result.stderr


#: Configs that need no CIFAR-10, and the overrides that make each family's model tiny and its data a few batches.
SMALL_RUN_OVERRIDES = {
    "RecurrentNet": ["--model.hidden_size=16", "--data.val_size=50", "--data.test_size=50"],
    "TransformerLM": ["--data.val_batches=1", "--model.depth=1", "--model.width=16", "--model.heads=2"],
}
DATA_FREE_CONFIGS = [c for c in CONFIGS if any(family in c.read_text() for family in SMALL_RUN_OVERRIDES)]


@pytest.mark.parametrize("config", DATA_FREE_CONFIGS, ids=[c.stem for c in DATA_FREE_CONFIGS])
def test_every_sequence_and_text_config_trains_a_few_steps(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (family,) = [family for family in SMALL_RUN_OVERRIDES if family in config.read_text()]
    overrides = list(SMALL_RUN_OVERRIDES[family])
    if family == "TransformerLM":
        text = tmp_path / "text.txt"
        text.write_text("".join(chr(32 + i % 65) for i in range(3000)))  # 65 characters, as tiny Shakespeare
        overrides.append(f"--data.path={text}")
    cli = StabilizeCLI(
        args=[
            "fit",
            "--config",
            str(config),
            *overrides,
            "--data.train_batches=3",
            "--trainer.max_steps=3",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_step"])


GAN_CONFIGS = [REPO / "configs" / "dcgan.yaml", REPO / "configs" / "sngan.yaml"]


@pytest.mark.parametrize("config", GAN_CONFIGS, ids=[c.stem for c in GAN_CONFIGS])
def test_gan_configs_train_then_test_with_the_committed_classifier(
    config: Path, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(config), "--model.ngf=8", "--model.ndf=8", f"--data.data_dir={tiny_cifar}"]
    quiet = ["--trainer.enable_progress_bar=false", "--data.batch_size=20"]
    fit = StabilizeCLI(args=["fit", *common, *quiet, "--trainer.max_steps=4", "--trainer.logger=false"])
    assert fit.trainer.global_step == 4  # two batches: two steps of each network
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    tested = StabilizeCLI(args=["test", *common, *quiet, f"--ckpt_path={checkpoint}"])  # the config's SampleQuality
    assert tested.trainer.callback_metrics["gan/classifier_fid"] > 0


@pytest.mark.parametrize("kind", ["missing", "folder", "truncated", "garbage", "foreign"])
def test_a_bad_checkpoint_path_is_one_message_naming_the_file(
    kind: str, python_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "folder":
        path.mkdir()
    elif kind == "truncated":  # a kill while the checkpoint was being written
        path.write_bytes(python_checkpoint.read_bytes()[:5000])
    elif kind == "garbage":
        path.write_text("not a checkpoint")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "ResNet", f"--ckpt_path={path}"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f"--ckpt_path {path}" in error and "Traceback" not in error
    expected = {
        "missing": "no such file",
        "folder": "it is a folder",
        "truncated": "truncated",
        "garbage": "cannot be read",
        "foreign": "not a Lightning checkpoint",
    }
    assert expected[kind] in error


@pytest.mark.parametrize("command", ["fit", "study"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_training(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    if command == "fit":
        args = ["fit", "--model", "ResNet", f"--trainer.default_root_dir={blocker / 'runs'}"]
    else:
        args = ["study", "--config", str(Path(__file__).parents[1] / "configs/study/quickstart.yaml")]
        args += [f"--out={blocker / 'runs'}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in error and "Traceback" not in error
    assert not (tmp_path / "lightning_logs").exists()


def test_help_lists_every_subcommand_and_version_prints(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "study", "configs"):
        assert f"\n  {subcommand} " in text, subcommand
    models = next(line for line in text.splitlines() if line.startswith("Models:")).split(": ")[1].split(", ")
    assert {"ResNet", "TransformerLM", "DCGAN"} <= set(models)
    assert not {"TrainingRecipe", "ImageClassifier", "DeviceLoggedModule"} & set(models)  # bases, not models
    assert "SequenceTaskDataModule" not in text
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"stabilize {stabilize.__version__}"


def test_the_overview_names_every_model_and_datamodule_of_the_packages() -> None:
    # The launcher lists them without importing the packages: the lists must be the classes they define.
    from lightning.pytorch import LightningDataModule, LightningModule

    from stabilize import launcher
    from stabilize.cli_arguments import _short_names

    assert list(launcher.MODEL_NAMES) == _short_names(LightningModule, "stabilize.models")
    assert list(launcher.DATA_NAMES) == _short_names(LightningDataModule, "stabilize.datamodules")


def test_version_help_and_configs_answer_without_importing_torch(tmp_path: Path) -> None:
    # Not a timing (a loaded machine varies): the seconds go into importing torch and Lightning, which these skip.
    script = (
        "import sys; from stabilize.launcher import main; main(['--version']); main([]); main(['configs']);"
        " heavy = {'torch', 'lightning', 'jsonargparse'} & set(sys.modules); assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"stabilize {stabilize.__version__}\nusage: stabilize")


def test_configs_lists_the_shipped_ones_and_prints_one(capsys: pytest.CaptureFixture) -> None:
    main(["configs"])
    listing = capsys.readouterr().out
    assert "resnet20 " in listing and "quickstart " in listing
    main(["configs", "resnet20"])
    assert capsys.readouterr().out == (REPO / "stabilize" / "configs" / "resnet20.yaml").read_text() + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--model", "ResNt"], "--model 'ResNt': no such LightningModule. Did you mean 'ResNet'?"),
        (["fit", "--model=ResNet", "--data=CIFAR10DataModul"], "Did you mean 'CIFAR10DataModule'?"),
        (["fit", "--trainer.callbacks+=GradientHealthCallbak"], "Did you mean 'GradientHealthCallback'?"),
        (["fit", "--config", "resnt20"], "No config 'resnt20': not a file, nor a shipped config"),
        (["study", "quickstrt"], "No study grid 'quickstrt'"),
        (["fitt"], "No subcommand 'fitt'. Did you mean 'fit'?"),
        (["fit", "--trainer.max_epocs", "1"], "--trainer.max_epocs: did you mean --trainer.max_epochs?"),
        # No argparse abbreviations: a prefix of an option is a typo, not the option.
        (["fit", "--trainer.max_epoch", "1"], "--trainer.max_epoch: did you mean --trainer.max_epochs?"),
        (["fit", "--model", "ResNet", "--model.deptth", "8"], "no argument 'deptth'. Did you mean --model.depth?"),
    ],
)
def test_a_misspelt_name_is_one_message_with_the_right_name(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    # The cause and a suggestion, then where to read more: no usage (jsonargparse's is 50 lines).
    assert message in error and "Traceback" not in error and len(error.splitlines()) <= 3, error


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path: Path) -> None:
    result = stabilize_command("fit", "--config", "resnet20", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: stabilize.models.ResNet" in result.stdout
    assert "args parameter is intended" not in result.stderr  # the console script lets Lightning read sys.argv


def test_study_by_name_speaks_studys_flags_when_data_is_missing(tmp_path: Path) -> None:
    result = stabilize_command("study", "quickstart", f"--data-dir={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "with --data-dir" in result.stderr and "--data.data_dir" not in result.stderr
    assert not (tmp_path / "studies").exists()  # nothing half-made


def test_the_wheel_installed_in_a_fresh_venv_runs_the_quickstart_from_another_folder(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """README's first command as a `pip install` user runs it: the wheel installed with pip into a new venv (its
    dependencies, torch and Lightning, borrowed from this environment through a path file rather than installed
    again), the `stabilize` console script run outside the checkout, the shipped grid found by name."""
    import sysconfig
    import zipfile

    setuptools = pytest.importorskip("setuptools")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")  # older setuptools builds wheels only with the wheel package
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("stabilize-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "stabilize/configs/resnet20.yaml" in names and "stabilize/configs/study/quickstart.yaml" in names
    assert "stabilize/assets/cifar10-resnet20-classifier.ckpt" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path line: the directories are searched after the venv's own, and the .pth files in them (this
    # checkout's editable install among them) are not processed, so `stabilize` can only come from the wheel.
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(fresh_site) / "borrowed_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "STABILIZE_CIFAR10_DIR")}
    env["PYTHONWARNINGS"] = "ignore"
    shown = subprocess.run(
        [str(python), "-c", "import stabilize; print(stabilize.__file__)"], cwd=elsewhere, env=env, capture_output=True
    )
    assert shown.stdout.decode().strip() == str(Path(fresh_site) / "stabilize" / "__init__.py")
    study = subprocess.run(
        [str(venv / "bin" / "stabilize"), "study", "quickstart", "--smoke", f"--data-dir={tiny_cifar}"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert study.returncode == 0, study.stderr[-3000:]
    lines = study.stdout.splitlines()
    header = next(n for n, line in enumerate(lines) if line.split()[:3] == ["run", "test", "acc"])
    rows = [line.split()[0] for line in lines[header + 1 : header + 4]]
    assert rows == ["plain-20-sigmoid", "batchnorm-20-sigmoid", "resnet-20-sigmoid"]
    assert (elsewhere / "studies" / "quickstart-cpu-small-smoke" / "report.md").is_file()


def test_a_log_file_gets_plain_lines_not_redraws_nor_tips(tiny_cifar: Path, tmp_path: Path) -> None:
    """Output that is not a terminal: LineProgress instead of the bar, no carriage returns, no promotional tip."""
    result = stabilize_command(
        "fit",
        "--model=ResNet",
        "--model.depth=8",
        *tiny_data_args(tiny_cifar),
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "\r" not in output and "Tip:" not in output and "LeafSpec" not in output
    assert "epoch 0 done  step 10" in result.stderr


def test_turning_checkpointing_or_logging_off_drops_the_configs_callbacks_that_need_them(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    # resnet20's config lists a ModelCheckpoint and a LearningRateMonitor; Lightning refuses either without
    # checkpointing or a logger.
    cli = StabilizeCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "configs" / "resnet20.yaml"),
            *tiny_data_args(tiny_cifar)[2:],
            "--model.depth=8",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 1
    assert not any(isinstance(c, (ModelCheckpoint, LearningRateMonitor)) for c in cli.trainer.callbacks)
    err = capsys.readouterr().err
    assert "--trainer.enable_checkpointing false: leaving out the config's ModelCheckpoint" in err
    assert "--trainer.logger false: leaving out the config's LearningRateMonitor" in err
