"""InterruptCheckpoint: a resumable checkpoint when the run is preempted (SIGTERM) or interrupted (Ctrl+C)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from stabilize.errors import ConfigurationError


class InterruptCheckpoint(Callback):
    """Write ``interrupted.ckpt`` when ``fit`` stops on SIGTERM (a preempted job) or SIGINT (Ctrl+C), so that the run
    resumes where it stopped: ``stabilize fit --config ... --ckpt_path <dirpath>/interrupted.ckpt``.

    Unlike Lightning's ``OnExceptionCheckpoint`` it ignores other exceptions (a crash or non-finite weights must not
    leave a checkpoint that looks resumable), keeps the file after the run, and works with
    ``enable_checkpointing=False`` (it is a plain Callback, not a ``Checkpoint``). The ``stabilize`` command attaches it
    to every ``fit``; it then exits non-zero (143 after SIGTERM, Lightning's 1 after Ctrl+C).

    Args:
        dirpath: Folder of the checkpoint; defaults to ``<log dir>/checkpoints`` (the default root dir without a
            logger), resolved when training starts.
        filename: File name without the ``.ckpt`` extension.
        resume_hint: How to resume, printed after the checkpoint's path; by default the ``stabilize fit`` flag
            (a study's runner says to rerun the study instead).

    Raises:
        ConfigurationError: If ``filename`` is empty.

    Example:
        ```python
        trainer = Trainer(callbacks=[InterruptCheckpoint()])
        trainer.fit(model, datamodule)                    # kill -TERM <pid> -> checkpoints/interrupted.ckpt
        trainer.fit(model, datamodule, ckpt_path=".../checkpoints/interrupted.ckpt")
        ```

    """

    def __init__(
        self, dirpath: str | None = None, filename: str = "interrupted", resume_hint: str | None = None
    ) -> None:
        super().__init__()
        if not filename:
            raise ConfigurationError("InterruptCheckpoint needs a non-empty filename.")
        self.dirpath = dirpath
        self.filename = filename
        self.resume_hint = resume_hint
        self.last_path: Path | None = None

    def path(self, trainer: Trainer) -> Path:
        folder = self.dirpath or str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
        return Path(folder) / f"{self.filename}.ckpt"

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != "fit":
            return
        path = self.path(trainer)
        trainer.save_checkpoint(path)
        self.last_path = path
        signal = "SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT"
        hint = self.resume_hint or (
            f"Resume with the same command plus --ckpt_path {path} (Python: trainer.fit(..., ckpt_path=...))."
        )
        rank_zero_info(
            f"{signal} at optimizer step {trainer.global_step}: wrote the resumable checkpoint {path}. {hint}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "filename": self.filename}
