"""Building blocks shared by every network in `stabilize.models`.

As in torchvision's ``models/resnet.py``, the normalization layer and the activation are *injected* as factories,
so the fragile plain network, its normalized twin and the residual networks are assembled from the same pieces
instead of being copies that drift apart. A factory is a callable: ``norm_layer(num_channels) -> nn.Module`` and
``activation() -> nn.Module``; `get_norm_layer` and `get_act_layer` turn names into factories (timm's
naming, which keeps the functions apart from the ``norm_layer`` arguments they produce).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabilize.errors import ConfigurationError

NormLayer = Callable[[int], nn.Module]
ActivationLayer = Callable[[], nn.Module]

ActivationName = Literal["relu", "tanh", "sigmoid", "gelu", "leaky_relu", "silu", "elu"]
NormName = Literal["batch", "group", "layer", "none"]
InitName = Literal["kaiming", "xavier", "default", "small_normal"]

ACTIVATIONS: dict[str, ActivationLayer] = {
    "relu": partial(nn.ReLU, inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": partial(nn.LeakyReLU, 0.01, inplace=True),
    "silu": partial(nn.SiLU, inplace=True),
    "elu": partial(nn.ELU, inplace=True),
}

# Gain names understood by torch.nn.init.calculate_gain / kaiming_normal_. GELU, SiLU and ELU have no closed-form
# gain there; ReLU's is the usual stand-in (they pass the positive half and damp the negative one).
GainName = Literal["relu", "tanh", "sigmoid", "leaky_relu"]
_INIT_NONLINEARITY: dict[str, GainName] = {
    "relu": "relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "gelu": "relu",
    "leaky_relu": "leaky_relu",
    "silu": "relu",
    "elu": "relu",
}

GROUP_NORM_GROUPS = 8
#: Channels of the three stages of the CIFAR networks of He et al. (2016), plain and residual alike.
STAGE_WIDTHS = (16, 32, 64)


def get_act_layer(name: str) -> ActivationLayer:
    """Return the factory for the activation called ``name`` (see `ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigurationError(
            f"Unknown activation {name!r}; expected one of {list(get_args(ActivationName))}."
        ) from None


def _group_norm(num_channels: int, num_groups: int) -> nn.GroupNorm:
    # Narrow layers (e.g. 16 channels with 32 groups) cannot be split evenly: fall back to the largest divisor.
    groups = math.gcd(num_channels, num_groups)
    return nn.GroupNorm(groups, num_channels)


def get_norm_layer(name: str) -> NormLayer | None:
    """Return the factory for the normalization called ``name``; ``"none"`` gives ``None`` (no normalization).

    ``"layer"`` normalizes over (C, H, W) per sample, i.e. ``GroupNorm`` with one group, which is what LayerNorm
    means for convolutional feature maps.
    """
    try:
        return NORM_LAYERS[name]
    except KeyError:
        raise ConfigurationError(
            f"Unknown normalization {name!r}; expected one of {list(get_args(NormName))}."
        ) from None


NORM_LAYERS: dict[str, NormLayer | None] = {
    "batch": nn.BatchNorm2d,
    "group": partial(_group_norm, num_groups=GROUP_NORM_GROUPS),
    "layer": partial(nn.GroupNorm, 1),
    "none": None,
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (keeps the spatial size at stride 1)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution, used by projection shortcuts."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias)


class ConvNormAct(nn.Sequential):
    """``conv3x3 -> norm -> activation``; without a norm layer the convolution gets its own bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormLayer | None = None,
        activation: ActivationLayer = ACTIVATIONS["relu"],
    ) -> None:
        layers: list[nn.Module] = [conv3x3(in_channels, out_channels, stride, bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        layers.append(activation())
        super().__init__(*layers)


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut of He et al. (2016): subsample by ``stride``, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"Option-A shortcut cannot reduce channels ({in_channels} -> {out_channels}).")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            before = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))
        return x


ShortcutName = Literal["A", "B"]


def shortcut(
    in_channels: int, out_channels: int, stride: int, kind: str, norm_layer: NormLayer | None
) -> nn.Module | None:
    """Shortcut for a residual block; ``None`` where the identity fits (same shape).

    ``kind="A"`` is the parameter-free zero-padding shortcut used for the CIFAR ResNets in the paper; ``kind="B"``
    is a strided 1x1 projection (followed by the norm layer where there is one).
    """
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "A":
        return PadShortcut(in_channels, out_channels, stride)
    if kind == "B":
        layers: list[nn.Module] = [conv1x1(in_channels, out_channels, stride, bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        return nn.Sequential(*layers)
    raise ConfigurationError(f"Unknown shortcut {kind!r}; expected 'A' (zero padding) or 'B' (1x1 projection).")


class BasicBlock(nn.Module):
    """The two-convolution residual block of He et al. (2016) for CIFAR.

    Post-activation (``preact=False``): ``act(norm(conv(act(norm(conv(x))))) + shortcut(x))``.
    Pre-activation (``preact=True``, He et al. 2016b): ``conv(act(norm(conv(act(norm(x)))))) + shortcut(x)``,
    which keeps the identity path free of any nonlinearity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        activation: ActivationLayer = ACTIVATIONS["relu"],
        shortcut_kind: str = "A",
        preact: bool = False,
    ) -> None:
        super().__init__()
        self.preact = preact
        use_bias = norm_layer is None

        def norm(channels: int) -> nn.Module:
            return norm_layer(channels) if norm_layer is not None else nn.Identity()

        self.norm1 = norm(in_channels if preact else out_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride, bias=use_bias)
        self.act1 = activation()
        self.conv2 = conv3x3(out_channels, out_channels, bias=use_bias)
        self.norm2 = norm(out_channels)
        self.act2 = activation()
        # Pre-activation projections see the already normalized input, so they carry no norm of their own.
        self.shortcut = shortcut(in_channels, out_channels, stride, shortcut_kind, None if preact else norm_layer)

    def zero_init_last(self) -> None:
        """Zero the layer that closes the residual branch (its last norm scale; its last conv in pre-activation
        form), so that the block starts as the identity (Goyal et al. 2017)."""
        last = self.conv2 if self.preact else self.norm2
        weight = getattr(last, "weight", None)
        if isinstance(weight, Tensor):
            nn.init.zeros_(weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            out = self.act1(self.norm1(x))
            identity = x if self.shortcut is None else self.shortcut(out)
            out = self.conv1(out)
            out = self.conv2(self.act2(self.norm2(out)))
            return out + identity
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + identity)


class Bias(nn.Module):
    """A learnable scalar added to the input (Fixup's replacement for the shift of a norm layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class FixupBasicBlock(nn.Module):
    """Residual block without normalization, trained stably by Fixup initialisation (Zhang et al., 2019).

    ``x -> +b1 -> conv1 -> +b2 -> act -> +b3 -> conv2 -> *scale -> +b4``, added to the shortcut, then ``act``.
    `fixup_init` rescales ``conv1`` by ``L^{-1/2}`` (L residual branches) and zeroes ``conv2``, so every
    block starts as the identity and the output variance does not grow with depth.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        activation: ActivationLayer = ACTIVATIONS["relu"],
        shortcut_kind: str = "A",
    ) -> None:
        super().__init__()
        self.bias1a, self.bias1b, self.bias2a, self.bias2b = Bias(), Bias(), Bias(), Bias()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.act1 = activation()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.scale = nn.Parameter(torch.ones(1))
        self.act2 = activation()
        self.shortcut = shortcut(in_channels, out_channels, stride, shortcut_kind, None)

    def zero_init_last(self) -> None:
        """Zero the branch's last conv, so that the block starts as the identity."""
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x_biased = self.bias1a(x)
        identity = x if self.shortcut is None else self.shortcut(x_biased)
        out = self.act1(self.bias1b(self.conv1(x_biased)))
        out = self.bias2b(self.conv2(self.bias2a(out)) * self.scale)
        return self.act2(out + identity)


def init_weights(module: nn.Module, scheme: str, activation: str = "relu", scale: float = 1.0) -> None:
    """Initialise every conv and linear weight of ``module`` in place, then multiply it by ``scale``.

    - ``kaiming``: He normal, fan-in, with the gain of ``activation``; biases zero.
    - ``xavier``: Glorot normal with the gain of ``activation``; biases zero.
    - ``default``: leave PyTorch's own initialisation (Kaiming uniform with a=sqrt(5)) untouched.
    - ``small_normal``: N(0, 0.01^2), the "naive" init of early deep nets; biases zero. With sigmoid or tanh and
      some depth this is the textbook way to make gradients vanish.

    A ``scale`` above 1 makes every layer amplify its input, so a deep plain net's activations and gradients grow
    geometrically with depth: the textbook way to make gradients explode.
    """
    if scheme == "default":
        if scale != 1.0:
            raise ConfigurationError("init='default' keeps PyTorch's initialisation; it cannot be scaled.")
        return
    nonlinearity = _INIT_NONLINEARITY.get(activation, "relu")
    for layer in module.modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "kaiming":
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity=nonlinearity)
        elif scheme == "xavier":
            nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain(nonlinearity))
        elif scheme == "small_normal":
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
        else:
            raise ConfigurationError(f"Unknown init {scheme!r}; expected one of {list(get_args(InitName))}.")
        if scale != 1.0:
            with torch.no_grad():
                layer.weight.mul_(scale)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def fixup_init(blocks: Sequence[FixupBasicBlock], head: nn.Linear) -> None:
    """Fixup rule for two-layer branches: ``conv1 *= L^{-1/2}`` after He init, ``conv2 = 0``, head zeroed."""
    num_branches = len(blocks)
    for block in blocks:
        nn.init.kaiming_normal_(block.conv1.weight, mode="fan_in", nonlinearity="relu")
        block.conv1.weight.data.mul_(num_branches**-0.5)
        block.zero_init_last()
    nn.init.zeros_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


class ClassifierHead(nn.Sequential):
    """Global average pooling, flatten, linear layer to the logits (no activation on the logits)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))

    @property
    def linear(self) -> nn.Linear:
        layer = self[-1]
        assert isinstance(layer, nn.Linear)
        return layer
