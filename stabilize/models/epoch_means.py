"""Training scalars logged as ``self.log(name, value, on_step=True, on_epoch=True)`` logs them, without its cost per
step: the step's value joins a weighted sum on the device, and Lightning's ``log`` runs only where a logger will
read it (logging steps, the end of an epoch).

A ``self.log`` call is about half a millisecond of Python, paid on every step whether or not a logger writes that
step; on a GPU the host is then the bottleneck of small and medium models (issue 22). Between logging steps the
values here cost one in-place add each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning.pytorch import Trainer


class EpochMeans:
    """Weighted means of scalars accumulated on the device since the last :meth:`reset`: one in-place add per value
    and step, no host sync. Plain torch; the means are read (and moved to the host) only by whoever logs them.

    Example::

        means = EpochMeans()
        means.add("train/loss", loss, weight=len(batch))
        means.means()  # {"train/loss": tensor(...)}: sum(loss_i * weight_i) / sum(weight_i)
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
