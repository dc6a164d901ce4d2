"""SwapActivations: replace saturating activation modules (Sigmoid, Tanh) by non-saturating ones."""

from __future__ import annotations

from typing import Literal, get_args

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from stabilize.errors import ConfigurationError

Activation = Literal["relu", "gelu", "selu", "leaky_relu"]
#: The activation modules that saturate: their derivative is near 0 over most of their input range.
SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid)
_NEW = {"relu": nn.ReLU, "gelu": nn.GELU, "selu": nn.SELU, "leaky_relu": nn.LeakyReLU}


class SwapActivations(Callback):
    """Replace every saturating activation *module* of the model (``nn.Sigmoid``, ``nn.Tanh``, ``nn.Hardtanh``,
    ``nn.Hardsigmoid``) by ``to`` before training starts (in ``setup``, before the optimizers are built).

    Only modules can be swapped: an activation the model calls as a function (``torch.sigmoid(x)``) is not seen,
    and a sigmoid that is part of the task (a gate of an LSTM, the output of a binary classifier written as a
    module at the end) is swapped too unless ``skip_last`` keeps the last one. Pair it with
    `Reinitialize` (listed after it): the initialisation that suited the old activation
    rarely suits the new one. Warns when the model has no module to swap.

    Args:
        to: ``"relu"``, ``"gelu"``, ``"selu"`` or ``"leaky_relu"``.
        skip_last: Keep the last saturating module of the model (an output squashing).

    Raises:
        ConfigurationError: For an unknown activation.

    Example:
        ```python
        trainer = Trainer(callbacks=[SwapActivations("relu"), Reinitialize("he")])
        ```

    Logs nothing; says on rank zero how many modules it swapped.
    """

    def __init__(self, to: Activation = "relu", skip_last: bool = False) -> None:
        super().__init__()
        if to not in get_args(Activation):
            raise ConfigurationError(f"to must be one of {list(get_args(Activation))}, got {to!r}.")
        self.to = to
        self.skip_last = skip_last
        #: Qualified names of the modules swapped by the last ``setup``.
        self.swapped: list[str] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.swapped = swap_activations(pl_module, self.to, self.skip_last)
        if not self.swapped:
            rank_zero_warn(
                "SwapActivations found no Sigmoid/Tanh module to swap: the model calls its activations as functions"
                " (torch.sigmoid, F.tanh), which only its code can change."
            )
        else:
            rank_zero_info(f"SwapActivations: {len(self.swapped)} activation modules now {self.to}.")


def swap_activations(module: nn.Module, to: Activation, skip_last: bool = False) -> list[str]:
    """Replace ``module``'s saturating activation modules by ``to`` in place; the swapped modules' names."""
    found = [name for name, m in module.named_modules() if isinstance(m, SATURATING)]
    if skip_last and found:
        found = found[:-1]
    for name in found:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, _NEW[to]())
    return found


__all__ = ["SATURATING", "Activation", "SwapActivations", "swap_activations"]
