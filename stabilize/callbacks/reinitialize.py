"""Reinitialize: give every trainable Linear, convolution and recurrent layer a standard initialisation."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from stabilize.errors import ConfigurationError, check_integers

InitScheme = Literal["auto", "he", "xavier", "lecun", "orthogonal"]
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.PReLU, nn.Mish)


class Reinitialize(Callback):
    """Re-initialise the model's trainable ``nn.Linear``, ``nn.ConvNd`` and recurrent layers before training starts
    (in ``setup``, before the optimizers are built), with biases set to zero: the cure for a scale that makes a deep
    plain network's signal grow or shrink layer after layer (weights N(0, 1), or N(0, 0.01^2) under sigmoid), and for
    biases that start every ReLU dead.

    ``"auto"`` picks by the activation modules the model has: He (fan-in, ReLU gain) when it has ReLU-like ones and no
    saturating ones, LeCun (fan-in, gain 1) with SELU, Xavier with the tanh gain with tanh, else Xavier with gain 1
    (sigmoid, or no activation modules). Recurrent layers' hidden-to-hidden weights (``nn.RNN``/``LSTM``/``GRU`` and
    their cells) become orthogonal under every scheme, their input weights follow it. Frozen layers
    (``requires_grad=False``: a pretrained backbone), embeddings and normalization layers are left alone. The draws
    come from a generator of their own (``seed``), so the run's data order and dropout masks are the same as without
    the callback.

    Args:
        scheme: ``"auto"``, ``"he"``, ``"xavier"``, ``"lecun"`` or ``"orthogonal"``.
        seed: Seed of the generator the new weights are drawn from.

    Raises:
        ConfigurationError: For an unknown scheme or a seed that is not an integer.

    Example:
        ```python
        trainer = Trainer(callbacks=[Reinitialize("he")])
        ```

    Logs nothing; says on rank zero how many layers it re-initialised and with which scheme.
    """

    def __init__(self, scheme: InitScheme = "auto", seed: int = 0) -> None:
        super().__init__()
        if scheme not in get_args(InitScheme):
            raise ConfigurationError(f"scheme must be one of {list(get_args(InitScheme))}, got {scheme!r}.")
        check_integers(None, seed=seed)
        self.scheme = scheme
        self.seed = seed
        #: Layers re-initialised by the last ``setup`` (their qualified names).
        self.layers: list[str] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        scheme = self.scheme if self.scheme != "auto" else auto_scheme(pl_module)
        self.layers = reinitialize(pl_module, scheme, torch.Generator().manual_seed(self.seed))
        rank_zero_info(f"Reinitialize: {len(self.layers)} layers re-initialised ({scheme}).")


def auto_scheme(module: nn.Module) -> InitScheme:
    """The scheme ``"auto"`` picks for ``module`` (see `Reinitialize`)."""
    modules = list(module.modules())
    if any(isinstance(m, nn.SELU) for m in modules):
        return "lecun"
    saturating = any(isinstance(m, (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid)) for m in modules)
    if any(isinstance(m, _RELU_LIKE) for m in modules) and not saturating:
        return "he"
    return "xavier"


def reinitialize(module: nn.Module, scheme: InitScheme, generator: torch.Generator) -> list[str]:
    """Re-initialise ``module``'s trainable linear, convolution and recurrent layers in place; their names."""
    tanh = any(isinstance(m, nn.Tanh) for m in module.modules())
    gain = nn.init.calculate_gain("tanh") if tanh and scheme == "xavier" else 1.0
    done = []
    for name, layer in module.named_modules():
        recurrent = isinstance(layer, (nn.RNNBase, nn.RNNCellBase))
        if not (isinstance(layer, (nn.Linear, *_CONVOLUTIONS)) or recurrent):
            continue
        own = dict(layer.named_parameters(recurse=False))
        if not own or not all(p.requires_grad for p in own.values()):
            continue
        with torch.no_grad():
            for key, parameter in own.items():
                if key.startswith("bias"):
                    parameter.zero_()
                elif recurrent and key.startswith("weight_hh"):
                    _orthogonal_blocks(parameter, generator)
                elif parameter.ndim >= 2:
                    _initialise(parameter, scheme, gain, generator)
        done.append(name)
    return done


def _initialise(weight: torch.Tensor, scheme: InitScheme, gain: float, generator: torch.Generator) -> None:
    if scheme == "he":
        nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
    elif scheme == "lecun":
        nn.init.kaiming_normal_(weight, nonlinearity="linear", generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, generator=generator)
    else:
        nn.init.xavier_normal_(weight, gain=gain, generator=generator)


def _orthogonal_blocks(weight: torch.Tensor, generator: torch.Generator) -> None:
    """An orthogonal matrix per gate (an LSTM's ``weight_hh`` stacks four square blocks)."""
    hidden = weight.shape[1]
    for block in weight.split(hidden, dim=0):
        nn.init.orthogonal_(block, generator=generator)


__all__ = ["InitScheme", "Reinitialize", "auto_scheme", "reinitialize"]
