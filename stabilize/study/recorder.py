"""StudyRecorder: the curves a study plots, gathered during ``fit`` without a host sync per step."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override


class StudyRecorder(Callback):
    """Records the training loss of every step, validation accuracy at each epoch end and test accuracy at each
    epoch end but the last (by running the datamodule's test loader through the model in eval mode; the last one is
    ``Trainer.test``'s, which the study runs after ``fit``).

    Losses stay device tensors until the epoch ends (one transfer per epoch). Test accuracy uses the model's
    ``evaluation_logits`` when it has one (test-time augmentation), else its forward.

    Attributes:
        train_loss: ``(step, loss)`` of every optimizer step.
        epoch_loss: Mean training loss of each epoch.
        val_acc: ``(step, epoch, accuracy)`` at each validation epoch end.
        val_loss: ``(step, epoch, loss)`` at each validation epoch end (``val/loss``).
        test_acc: ``(step, accuracy)`` at each epoch end but the last.
        wall_time: Seconds from the start of training to its end (evaluations included).
    """

    def __init__(self) -> None:
        self.train_loss: list[tuple[int, float]] = []
        self.epoch_loss: list[float] = []
        self.val_acc: list[tuple[int, int, float]] = []
        self.val_loss: list[tuple[int, int, float]] = []
        self.test_acc: list[tuple[int, float]] = []
        self.wall_time = 0.0
        self._start = 0.0
        #: Training seconds of the attempts before a resume (the study's run continues from a checkpoint).
        self._earlier_seconds = 0.0
        self._losses: list[Tensor] = []
        self._steps: list[int] = []
        #: This epoch's ``(step, loss)`` from before a resume.
        self._restored: list[tuple[int, float]] = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().float())
            self._steps.append(trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pairs = self._restored + list(zip(self._steps, torch.stack(self._losses).tolist() if self._losses else []))
        if pairs:
            self.train_loss += pairs
            self.epoch_loss.append(sum(loss for _, loss in pairs) / len(pairs))
        self._losses, self._steps, self._restored = [], [], []

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracy = trainer.callback_metrics.get("val/acc")
        if accuracy is not None:
            self.val_acc.append((trainer.global_step, trainer.current_epoch, float(accuracy)))
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val_loss.append((trainer.global_step, trainer.current_epoch, float(loss)))
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if not last_epoch:
            self._record_test_accuracy(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.wall_time = self._earlier_seconds + time.perf_counter() - self._start

    @override
    def state_dict(self) -> dict[str, Any]:
        """The curves so far (this epoch's losses included, one host read) and the seconds spent, for a resume."""
        return {
            "train_loss": self.train_loss,
            "epoch_loss": self.epoch_loss,
            "val_acc": self.val_acc,
            "val_loss": self.val_loss,
            "test_acc": self.test_acc,
            "pending": self._restored
            + list(zip(self._steps, torch.stack(self._losses).tolist() if self._losses else [])),
            "seconds": self._earlier_seconds + (time.perf_counter() - self._start if self._start else 0.0),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_loss = [tuple(item) for item in state_dict["train_loss"]]
        self.epoch_loss = list(state_dict["epoch_loss"])
        self.val_acc = [tuple(item) for item in state_dict["val_acc"]]
        self.val_loss = [tuple(item) for item in state_dict.get("val_loss", [])]
        self.test_acc = [tuple(item) for item in state_dict["test_acc"]]
        self._restored = [(int(step), float(loss)) for step, loss in state_dict.get("pending", [])]
        self._earlier_seconds = float(state_dict.get("seconds", 0.0))

    def _record_test_accuracy(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # set by fit(); not a typed attribute of Trainer
        if datamodule is None or not is_overridden("test_dataloader", datamodule, LightningDataModule):
            return
        was_training = pl_module.training
        pl_module.eval()
        correct = torch.zeros((), dtype=torch.long, device=pl_module.device)
        total = 0
        predict = getattr(pl_module, "evaluation_logits", pl_module)
        with torch.no_grad():
            for batch in datamodule.test_dataloader():
                batch = datamodule.on_before_batch_transfer(batch, 0)
                batch = datamodule.transfer_batch_to_device(batch, pl_module.device, 0)
                x, y = datamodule.on_after_batch_transfer(batch, 0)
                logits = predict(x)
                if logits.ndim != 2 or y.ndim != 1 or y.is_floating_point():
                    break  # not a classifier of one label per example: no accuracy curve
                correct += (logits.argmax(-1) == y).sum()
                total += len(y)
        pl_module.train(was_training)
        if total:
            self.test_acc.append((trainer.global_step, correct.item() / total))
