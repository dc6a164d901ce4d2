"""Training scalars logged as ``self.log(name, value, on_step=True, on_epoch=True)`` logs them, without its cost per
step: the step's value joins a weighted sum on the device, and Lightning's ``log`` runs only where a logger will
read it (logging steps, the end of an epoch).

A ``self.log`` call is about half a millisecond of Python, paid on every step whether or not a logger writes that
step; on a GPU the host is then the bottleneck of small and medium models (issue 22). Between logging steps the
values here cost one in-place add each.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override


class EpochMeans:
    """Weighted means of scalars accumulated on the device since the last `reset`: one in-place add per value
    and step, no host sync. Plain torch; the means are read (and moved to the host) only by whoever logs them.

    Example:
        ```python
        means = EpochMeans()
        means.add("train/loss", loss, weight=len(batch))
        means.means()  # {"train/loss": tensor(...)}: sum(loss_i * weight_i) / sum(weight_i)
        ```

    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, float] = {}

    def add(self, name: str, value: Tensor, weight: float = 1.0) -> None:
        """Add ``value`` (a scalar tensor, any device) with ``weight`` to ``name``'s sum; float32 accumulation."""
        total = self._sums.get(name)
        if total is None:
            self._sums[name] = value.detach().float() * weight
            self._weights[name] = weight
        else:
            total.add_(value.detach(), alpha=weight)
            self._weights[name] += weight

    def sums(self) -> dict[str, tuple[Tensor, float]]:
        """Each name's weighted sum and total weight."""
        return {name: (total, self._weights[name]) for name, total in self._sums.items()}

    def means(self) -> dict[str, Tensor]:
        """Each name's weighted mean, on the device the values came from."""
        return {name: total / self._weights[name] for name, total in self._sums.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._weights.clear()

    def __len__(self) -> int:
        return len(self._sums)


def logs_this_step(trainer: Trainer) -> bool:
    """Whether Lightning writes the step values of the current training batch to the loggers: its own test (every
    ``log_every_n_steps`` optimizer steps, or a stopping step) or ``fast_dev_run`` (every step)."""
    # fast_dev_run is set on the Trainer at run time (not a typed attribute).
    return bool(trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False))


def epoch_ends_after_this_batch(trainer: Trainer) -> bool:
    """Whether the training batch that just ended is the epoch's last, as Lightning's loop will decide: its loader is
    exhausted, ``limit_train_batches`` or ``max_steps`` is reached, or a stop was requested that ``min_epochs`` /
    ``min_steps`` allow. ``False`` where this Lightning version does not say (the epoch's end then tells)."""
    fit_loop = trainer.fit_loop
    training_done = getattr(fit_loop.epoch_loop, "_is_training_done", False)
    return bool(training_done or (trainer.should_stop and getattr(fit_loop, "_can_stop_early", False)))


def reduce_sum(trainer: Trainer, value: Tensor) -> Tensor:
    """``value`` summed over the processes of a distributed run (itself on one process)."""
    if trainer.world_size <= 1:
        return value
    return torch.as_tensor(trainer.strategy.reduce(value, reduce_op="sum"))


class DeviceLoggedModule(LightningModule):
    """A LightningModule whose training scalars go through `log_train`: Lightning's keys and values, with the
    per-step cost of a device add. The base of every model here; subclasses that override ``on_train_batch_end`` or
    ``on_train_epoch_end`` call ``super()``."""

    #: A base to build on, not one to train: ``stabilize --help`` leaves it out of its list of classes.
    abstract_base = True

    def __init__(self) -> None:
        super().__init__()
        self._train_means = EpochMeans()
        #: This epoch's latest value of each name (value, batch size, progress bar), and the names logged this step.
        self._latest_train: dict[str, tuple[Tensor, int, bool]] = {}
        self._logged_this_step: set[str] = set()
        self._epoch_names: set[str] = set()

    @property
    def has_progress_bar(self) -> bool:
        """Whether the Trainer shows a progress bar. Lightning reads every progress-bar value with ``.item()`` at
        every step, a host sync on a GPU, so per-step values go to the bar only when there is one."""
        return self._trainer is not None and self.trainer.progress_bar_callback is not None

    def log_train(self, name: str, value: Tensor, batch_size: int, prog_bar: bool = False, epoch: bool = True) -> None:
        """Log a training scalar under the keys and with the values of ``self.log(name, value, on_step=True,
        on_epoch=epoch, batch_size=batch_size)``, at a fraction of its cost per step.

        With ``epoch``, loggers get ``{name}_step`` at logging steps (the latest value, as Lightning logs it even
        when this step did not log the name, provided the step logs some value) and ``{name}_epoch`` (the epoch's
        mean weighted by ``batch_size``, over all processes) at the end of each epoch; ``trainer.callback_metrics``
        holds the same keys and ``name`` (the step value during an epoch, the epoch mean after it). Without
        ``epoch``, ``name`` at logging steps. Between logging steps the value only joins a sum on the device, so
        ``callback_metrics`` and the progress bar (with ``prog_bar``, shown when the Trainer has one) change at
        logging steps; `latest_train_values` has every step's values.
        """
        value = value.detach()
        if epoch:
            self._train_means.add(name, value, batch_size)
            self._epoch_names.add(name)
        self._latest_train[name] = (value, batch_size, prog_bar)
        if self._trainer is not None and logs_this_step(self.trainer):
            # The first value of a logging step brings every name's latest value along (Lightning writes them all,
            # e.g. a generator loss from the last generator step); names logged later in this step overwrite theirs.
            names = [*self._latest_train] if not self._logged_this_step else [name]
            for logged in names:
                self._log_step_value(logged, under_name=True)
            self._logged_this_step.update(names)

    def latest_train_values(self) -> dict[str, Tensor]:
        """This epoch's latest training value of each name given to `log_train`, on the device."""
        return {name: value for name, (value, _, _) in self._latest_train.items()}

    def _log_step_value(self, name: str, under_name: bool) -> None:
        value, batch_size, prog_bar = self._latest_train[name]
        shown = prog_bar and self.has_progress_bar
        if name not in self._epoch_names:
            self.log(name, value, on_step=True, on_epoch=False, prog_bar=shown, batch_size=batch_size)
            return
        self.log(f"{name}_step", value, on_step=True, on_epoch=False, prog_bar=shown, batch_size=batch_size)
        if under_name:  # callback_metrics[name] holds the step value during an epoch
            self.log(name, value, on_step=True, on_epoch=False, logger=False, batch_size=batch_size)

    def _log_epoch_means(self) -> None:
        for name, (total, weight) in self._train_means.sums().items():
            total, weight_sum = reduce_sum(self.trainer, torch.stack([total, total.new_tensor(weight)]))  # one reduce
            mean = total / weight_sum
            shown = self._latest_train[name][2] and self.has_progress_bar
            self.log(f"{name}_epoch", mean, on_step=False, on_epoch=True, prog_bar=shown, batch_size=1)
            self.log(name, mean, on_step=False, on_epoch=True, logger=False, batch_size=1)
        self._train_means.reset()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer
        epoch_ends = epoch_ends_after_this_batch(trainer)
        if epoch_ends or trainer.should_stop:
            # The latest values of names this step did not log: Lightning writes them at the step a stop was
            # requested at, and callbacks read them in callback_metrics at the end of an epoch. Not under the plain
            # name (callback_metrics[name] becomes the epoch mean, logged from this hook too).
            for name in self._latest_train.keys() - self._logged_this_step:
                self._log_step_value(name, under_name=False)
        self._logged_this_step.clear()
        # Logged here rather than in on_train_epoch_end, so that callbacks' on_train_epoch_end (which runs before the
        # module's) see this epoch's means in callback_metrics, as with self.log(on_epoch=True).
        if epoch_ends:
            self._end_epoch()

    @override
    def on_train_epoch_end(self) -> None:
        self._end_epoch()  # an epoch that a stop request ended early (nothing left otherwise)

    def _end_epoch(self) -> None:
        self._log_epoch_means()
        self._latest_train.clear()  # as Lightning's step values, which start empty each epoch
