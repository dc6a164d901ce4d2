"""The ``stabilize`` command: Lightning's CLI over the model collection, the datamodules and the callbacks.

``stabilize fit --model ResNet --model.depth 56 --data CIFAR10DataModule`` or
``stabilize fit --config configs/resnet56.yaml``; ``validate``, ``test``, ``predict``, ``--print_config`` and
``--trainer.callbacks+=GradientHealthCallback`` work with the short class names of everything imported below.
Any other LightningModule or LightningDataModule can be named by its import path (``--model my_pkg.MyNet``).
``stabilize study --config configs/study/quickstart.yaml`` runs a grid of experiments (`stabilize.study`);
``stabilize doctor --config theirs.yaml`` tries the remedies on a failing run (`stabilize.doctor`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

# Imported for their side effect too: jsonargparse resolves short class names among the imported subclasses.
import stabilize.callbacks
import stabilize.datamodules
import stabilize.models  # noqa: F401
from stabilize.callbacks import InterruptCheckpoint, LineProgress
from stabilize.cli_arguments import resolve_arguments
from stabilize.errors import ConfigurationError, DataError, DataNotFoundError, StabilizeError, check_writable_folder
from stabilize.launcher import answered, fail

DEFAULT_SEED = 42
#: ``--ckpt_path`` values Lightning resolves itself (not file names).
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class StabilizeCLI(LightningCLI):
    """`LightningCLI` with subclass mode for model and data, TensorBoard logging
    (Lightning's default logger whenever tensorboard is installed, which it is as a dependency) and a fixed seed.

    ``--model`` accepts any LightningModule and ``--data`` any LightningDataModule (optional, for models that
    bring their own dataloaders). Errors raised by the classes' argument checks
    (`ConfigurationError`) are reported like jsonargparse's own parse errors, as one
    message and exit code 2, instead of a traceback; any other exception is a bug and keeps its traceback.
    """

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        # A second run or a resume in the same folder rewrites the saved config instead of refusing to start.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"callbacks": [InterruptCheckpoint()]})
        kwargs.setdefault("parser_class", ConciseArgumentParser)
        super().__init__(
            model_class=LightningModule,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # No abbreviations: argparse would take --trainer.max_epoch for --trainer.max_epochs, hiding typos in scripts.
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        # A flag that turns checkpointing or logging off also turns off the config's callbacks that need them
        # (Lightning would refuse the combination with a traceback).
        needs = {"enable_checkpointing": ModelCheckpoint, "logger": LearningRateMonitor}
        for flag, kind in needs.items():
            if config.get(flag) is False and any(isinstance(c, kind) for c in listed):
                listed = [c for c in listed if not isinstance(c, kind)]
                print(f"stabilize: --trainer.{flag} false: leaving out the config's {kind.__name__}", file=sys.stderr)
        config["callbacks"] = listed
        # Lightning's bar redraws thousands of times into a log file: plain lines there instead.
        chosen = [*listed, *callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not sys.stderr.isatty() and not any(isinstance(c, ProgressBar) for c in chosen):
            callbacks = [*callbacks, LineProgress()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse re-raises a constructor's error as its own ValueError, chained to the original.
            cause = _configuration_error(error)
            if cause is None:
                raise
            self.parser.error(str(cause))

    @override
    def _parse_ckpt_path(self) -> None:
        """Read the model's hyperparameters from ``--ckpt_path`` (as Lightning does), also from checkpoints saved in
        Python, which carry no class path, and refuse a checkpoint of another class than ``--model`` names."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            _check_output_folder(self.config[subcommand].get("trainer", {}).get("default_root_dir"))
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS or "://" in str(ckpt_path):
            return
        checkpoint = read_checkpoint(Path(ckpt_path))
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        saved = hparams.pop("_class_path", None)
        model = self.config[subcommand].get("model")
        given = model.get("class_path") if model is not None else None
        if saved and given and _import_class(saved) is not _import_class(given):
            raise ConfigurationError(
                f"{ckpt_path} holds a {saved.rsplit('.', 1)[-1]}, but --model is {given.rsplit('.', 1)[-1]}: drop"
                " --model (the checkpoint names its class) or pass the matching one."
            )
        class_path = saved or given
        if class_path is None:
            raise ConfigurationError(f"{ckpt_path} does not name its model class: pass it with --model.")
        update = {subcommand: {"model": {"class_path": class_path, "init_args": hparams}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except SystemExit as error:
            raise ConfigurationError(
                f"The hyperparameters saved in {ckpt_path} do not fit {class_path.rsplit('.', 1)[-1]} (the message"
                " above names the argument): is it a checkpoint of another model?"
            ) from error


class ConciseArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors say the cause first, in at most five lines: the error, the nearest option
    to a misspelt one, and where to find the rest (jsonargparse prints the whole usage, 50 lines, before the one line
    that matters). ``JSONARGPARSE_DEBUG`` set, or a parser that raises instead of exiting, behaves as jsonargparse's."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        lines = [f"{prog}: error: {line}" for line in _condensed(message)]
        lines += _option_suggestions(parser, message)[:3]
        lines.append(f"(`{prog} --help` lists every option)")
        sys.stderr.write("\n".join(lines[:5]) + "\n")
        self.exit(2)


def _condensed(message: str) -> list[str]:
    """jsonargparse's nested message for a class's argument (every Union subtype it tried, the value's repr) as the
    one line that matters, naming the flag; another message as it is, cut to three lines."""
    key = re.search(r'Parser key "(\w+)":', message)
    problem = re.search(r"Problem with given class_path '([\w.]+)':", message)
    if key and problem:
        name = problem.group(1).rsplit(".", 1)[-1]
        unknown = re.search(r"Option '(\w+)' is not accepted", message)
        if unknown:
            argument = unknown.group(1)
            accepted = _init_arguments(problem.group(1))
            near = difflib.get_close_matches(argument, accepted, n=1, cutoff=0.6)
            hint = f" Did you mean --{key.group(1)}.{near[0]}?" if near else ""
            return [f"--{key.group(1)}.{argument}: {name} takes no argument {argument!r}.{hint}"]
        wrong = re.search(r'Parser key "(\w+)":\s*Expected a (.+?)\. Got value: (.*)', message)
        if wrong:
            expected = re.sub(r"<class '([\w.]+)'>", r"\1", wrong.group(2))
            return [f"--{key.group(1)}.{wrong.group(1)}: {name} expects {expected}, got {wrong.group(3)!r}."]
    choice = re.search(r"invalid choice: '(\w+)' \(choose from (.*)\)", message)
    if choice:
        choices = re.findall(r"'(\w+)'", choice.group(2))
        near = difflib.get_close_matches(choice.group(1), choices, n=1)
        return [message.strip() + (f" Did you mean {near[0]!r}?" if near else "")]
    lines = message.strip().splitlines()
    return lines[:3] + (["... (JSONARGPARSE_DEBUG=1 shows the whole message)"] if len(lines) > 3 else [])


def _init_arguments(class_path: str) -> list[str]:
    found = _import_class(class_path)
    if not isinstance(found, type):
        return []
    return [p for p in inspect.signature(found).parameters if p not in ("args", "kwargs")]


def _option_suggestions(parser: LightningArgumentParser, message: str) -> list[str]:
    """``Did you mean --trainer.max_epochs?`` for each unrecognized ``--flag`` of ``message`` near a known one."""
    if "unrecognized arguments" not in message:
        return []
    known = sorted(option for option in parser._option_string_actions if option.startswith("--"))
    suggestions = []
    for word in message.split("unrecognized arguments:", 1)[1].split():
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            near = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
            suggestions.append(f"{flag}: did you mean {near[0]}?" if near else f"{flag}: no such option.")
    return suggestions


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents, or one message naming the file and what is wrong with it.

    Raises:
        DataNotFoundError: There is no file at ``path``.
        DataError: The file is not a complete checkpoint (truncated by a kill mid-write, or not a checkpoint).
    """
    if not path.is_file():
        raise DataNotFoundError(f"--ckpt_path {path}: no such file{' (it is a folder)' if path.is_dir() else ''}.")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch.load's errors for a damaged file are of many kinds
        size = path.stat().st_size
        raise DataError(
            f"--ckpt_path {path} ({size:,} bytes) cannot be read as a checkpoint ({type(error).__name__}): a file"
            " truncated by a kill while it was written, or not a PyTorch checkpoint. Resume from an earlier one."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        holds = type(checkpoint).__name__
        if isinstance(checkpoint, dict):
            holds += f" of {', '.join(map(str, list(checkpoint)[:5]))}"
        raise DataError(
            f"--ckpt_path {path} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'; it holds {holds})."
        )
    return checkpoint


def _check_output_folder(folder: str | None) -> None:
    """Refuse an output folder that cannot be written before anything trains, naming it."""
    if not folder or "://" in str(folder):
        return
    check_writable_folder(Path(folder), "--trainer.default_root_dir")


def _import_class(class_path: str) -> object:
    module, _, name = class_path.rpartition(".")
    for candidate in (module, "stabilize.models"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError, ValueError):
            continue
    return class_path


def _configuration_error(error: BaseException | None) -> ConfigurationError | None:
    """The `ConfigurationError` in ``error``'s chain of causes, if there is one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigurationError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``stabilize`` console script and of ``python -m stabilize``.

    A `StabilizeError` raised while running (missing or corrupt data, data that does not
    fit the model, a setting that only fails once the data is known) ends the command with one message and exit
    code 1 (2 for a setting); ``STABILIZE_DEBUG=1`` shows the traceback.
    """
    arguments = list(sys.argv[1:] if args is None else args)
    _quiet_lightning_noise()
    try:
        if answered(arguments):
            return
        if arguments[0] == "doctor":
            from stabilize.doctor.command import doctor_main

            doctor_main(arguments[1:])
            return
        if arguments[0] == "study":
            from stabilize.study.command import study_main

            study_main(arguments[1:])
            return
        arguments = resolve_arguments(arguments)
        if args is None:
            # From the console script: Lightning reads sys.argv itself (given args too, it warns about both).
            sys.argv = [sys.argv[0], *arguments]
            StabilizeCLI()
        else:
            StabilizeCLI(args=arguments)
    except SIGTERMException:
        print("stabilize: stopped by SIGTERM (see the checkpoint line above to resume)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except StabilizeError as error:
        fail(error)


def _quiet_lightning_noise() -> None:
    """Drop Lightning's promotional tips and a deprecation warning of Lightning's own code from the command's output
    (the library, imported in Python, leaves the caller's logging and warnings alone)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


if __name__ == "__main__":
    main()
