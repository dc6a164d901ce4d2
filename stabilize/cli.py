"""The ``stabilize`` command: Lightning's CLI over the model collection, the datamodules and the callbacks.

``stabilize fit --model ResNet --model.depth 56 --data CIFAR10DataModule`` or
``stabilize fit --config configs/resnet56.yaml``; ``validate``, ``test``, ``predict``, ``--print_config`` and
``--trainer.callbacks+=GradientHealthCallback`` work with the short class names of everything imported below.
Any other LightningModule or LightningDataModule can be named by its import path (``--model my_pkg.MyNet``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

# Imported for their side effect too: jsonargparse resolves short class names among the imported subclasses.
import stabilize.callbacks
import stabilize.datamodules
import stabilize.models  # noqa: F401

DEFAULT_SEED = 42


class StabilizeCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` with subclass mode for model and data, TensorBoard logging
    (Lightning's default logger whenever tensorboard is installed, which it is as a dependency) and a fixed seed.

    ``--model`` accepts any LightningModule and ``--data`` any LightningDataModule (optional, for models that
    bring their own dataloaders). Errors raised by the classes' argument checks (``ValueError``) are reported
    like jsonargparse's own parse errors, as one message and exit code 2, instead of a traceback.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        super().__init__(
            model_class=LightningModule,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            self.parser.error(str(error))


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``stabilize`` console script and of ``python -m stabilize``."""
    StabilizeCLI(args=args)


if __name__ == "__main__":
    main()
