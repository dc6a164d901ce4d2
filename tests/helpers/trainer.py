"""The one quiet Trainer of the test suite: CPU, no logger, checkpoints, progress bar or model summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer


def quiet_trainer(tmp_path: Path | None = None, **kwargs: Any) -> Trainer:
    """A Trainer that writes and prints nothing unless ``kwargs`` ask for it (they override every default)."""
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    if tmp_path is not None:
        defaults["default_root_dir"] = tmp_path
    return Trainer(**{**defaults, **kwargs})
