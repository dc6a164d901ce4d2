"""The ``stabilize`` console script's front: ``--version``, the overview (``stabilize``, ``--help``) and
``stabilize configs`` answer without importing torch or Lightning (which take seconds, more on a loaded machine);
every other command goes on to `stabilize.cli.main`.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence

import stabilize
from stabilize.errors import ConfigurationError, StabilizeError
from stabilize.shipped import configs_folder, require_config, shipped_names

DEBUG_ENV = "STABILIZE_DEBUG"
SUBCOMMANDS = ("fit", "validate", "test", "predict", "study", "doctor", "configs")
#: The collection's model and datamodule classes, for the overview without importing them (a test checks these
#: against the classes the packages define).
MODEL_NAMES = (
    "BatchNormCNN",
    "DCGAN",
    "DeepPlainCNN",
    "FastCNN",
    "FixupResNet",
    "PlainCNN",
    "RecurrentNet",
    "ResNet",
    "TransformerLM",
)
DATA_NAMES = (
    "AddingProblemDataModule",
    "CIFAR10DataModule",
    "CharTextDataModule",
    "CopyMemoryDataModule",
    "SequentialCIFAR10DataModule",
)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``stabilize`` console script and of ``python -m stabilize``."""
    arguments = list(sys.argv[1:] if args is None else args)
    try:
        if answered(arguments):
            return
    except StabilizeError as error:
        fail(error)
    except BrokenPipeError:  # `stabilize configs | head`: the reader left, which is no error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout at exit)
        return
    from stabilize.cli import main as run_command  # torch and Lightning from here on

    run_command(arguments if args is not None else None)


def answered(arguments: Sequence[str]) -> bool:
    """Answer the overview, ``--version`` and ``configs`` (True), or refuse an unknown subcommand, without torch.

    Raises:
        ConfigurationError: For a first argument that is neither an option nor a subcommand, or an unknown config.
    """
    if not arguments or arguments[0] in ("-h", "--help"):
        print(overview())
    elif arguments[0] == "--version":
        print(f"stabilize {stabilize.__version__}")
    elif arguments[0] == "configs":
        print(configs_command(arguments[1:]))
    elif not arguments[0].startswith("-") and arguments[0] not in SUBCOMMANDS:
        near = difflib.get_close_matches(arguments[0], SUBCOMMANDS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigurationError(f"No subcommand {arguments[0]!r}.{hint} The subcommands: {', '.join(SUBCOMMANDS)}.")
    else:
        return False
    return True


def fail(error: StabilizeError) -> None:
    """End the command with one message (exit code 2 for a setting, 1 otherwise); ``STABILIZE_DEBUG=1`` raises."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise error
    print(f"stabilize: error: {error}\n(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
    sys.exit(2 if isinstance(error, ConfigurationError) else 1)


def overview() -> str:
    """``stabilize --help``: every subcommand in one line, then where to read more."""
    version = stabilize.__version__
    return f"""usage: stabilize {{fit,validate,test,predict,study,doctor,configs}} ... (stabilize {version})

See, and stop, vanishing and exploding gradients: Lightning models, datamodules and GradientHealthCallback.

subcommands:
  fit        train a model: stabilize fit --config resnet20 [--data.data_dir DIR] (Lightning's CLI)
  validate   evaluate a checkpoint on the validation split (--ckpt_path FILE)
  test       evaluate a checkpoint on the test split (--ckpt_path FILE)
  predict    run a checkpoint's predictions
  study      train a grid of runs and write a report: stabilize study quickstart --data-dir DIR
  doctor     try the remedies on a failing run, say which works: stabilize doctor --config exploding_relu
  configs    list the shipped configs and grids, or print one: stabilize configs resnet20

options:
  -h, --help     this overview; `stabilize fit --help` lists every flag of a subcommand
  --version      the installed version

Models: {", ".join(MODEL_NAMES)}
Data:   {", ".join(DATA_NAMES)}"""


def configs_command(arguments: Sequence[str]) -> str:
    """``stabilize configs``: the shipped configs and grids with their first comment line; ``stabilize configs NAME``:
    the file itself (``> my.yaml`` to copy it)."""
    if arguments and not arguments[0].startswith("-"):
        name = arguments[0]
        kind = "study" if name in shipped_names("study") and name not in shipped_names() else "fit"
        return require_config(name, kind).read_text()
    lines = ["Experiment configs (stabilize fit --config NAME):"]
    lines += [f"  {name:<22} {_summary(name, 'fit')}" for name in shipped_names()]
    lines += ["", "Study grids (stabilize study NAME):"]
    lines += [f"  {name:<22} {_summary(name, 'study')}" for name in shipped_names("study")]
    lines += ["", f"Folder: {configs_folder()}; `stabilize configs NAME > my.yaml` copies one to edit."]
    return "\n".join(lines)


def _summary(name: str, kind: str) -> str:
    """The first comment line of a shipped config, cut to fit a line."""
    for line in require_config(name, kind).read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text if len(text) <= 90 else text[:87] + "..."
    return ""
