"""CIFAR ResNets (He et al. 2016, section 4.2), pre-activation ResNets (He et al. 2016b) and Fixup ResNets."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal, get_args

from torch import Tensor, nn
from typing_extensions import override

from stabilize.errors import ConfigurationError
from stabilize.models.base import ImageClassifier
from stabilize.models.blocks import (
    STAGE_WIDTHS,
    ActivationLayer,
    ActivationName,
    BasicBlock,
    ClassifierHead,
    FixupBasicBlock,
    InitName,
    NormLayer,
    ShortcutName,
    conv3x3,
    fixup_init,
    get_act_layer,
    get_norm_layer,
    init_weights,
)
from stabilize.models.variants import Variant

ResNetNorm = Literal["batch", "group", "layer"]
#: Builds a residual block from ``(in_channels, out_channels, stride=..., activation=..., shortcut_kind=...)``;
#: block-specific options (e.g. ``norm_layer``, ``preact``) are bound beforehand with `functools.partial`.
BlockFactory = Callable[..., nn.Module]


class CifarResNet(nn.Module):
    """Stem conv, three stages of ``blocks_per_stage`` residual blocks at widths 16/32/64 (times ``width``),
    global average pooling and a linear head. The block type, norm layer and activation are injected.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        block: BlockFactory = BasicBlock,
        width: float = 1.0,
        in_channels: int = 3,
        num_classes: int = 10,
        norm: NormLayer | None = nn.BatchNorm2d,
        activation: ActivationLayer = nn.ReLU,
        shortcut_kind: str = "A",
        preact: bool = False,
    ) -> None:
        super().__init__()
        widths = [max(1, round(w * width)) for w in STAGE_WIDTHS]
        stem: list[nn.Module] = [conv3x3(in_channels, widths[0], bias=norm is None)]
        if not preact:  # a pre-activation net normalizes at the start of each block instead
            stem += [norm(widths[0]) if norm is not None else nn.Identity(), activation()]
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        channels = widths[0]
        for index, stage_width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(
                    block(channels, stage_width, stride=stride, activation=activation, shortcut_kind=shortcut_kind)
                )
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks end in a conv, so the features still need their final norm + activation.
        self.final = (
            nn.Sequential(norm(channels) if norm is not None else nn.Identity(), activation())
            if preact
            else nn.Identity()
        )
        self.head = ClassifierHead(channels, num_classes)

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages.children() for block in stage.children()]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.final(self.stages(self.stem(x))))


def resnet_blocks_per_stage(depth: int) -> int:
    """Blocks per stage of a CIFAR ResNet of ``depth`` = 6n + 2 weight layers."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigurationError(f"A CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110, ...); got {depth}.")
    return (depth - 2) // 6


def check_resnet_arguments(depth: int, width: float, shortcut: str) -> None:
    """Validate the arguments every CIFAR ResNet variant shares (``ValueError`` with the accepted values)."""
    resnet_blocks_per_stage(depth)
    if not width > 0:
        raise ConfigurationError(f"width must be positive, got {width}.")
    if shortcut not in get_args(ShortcutName):
        raise ConfigurationError(f"shortcut must be 'A' (zero padding) or 'B' (1x1 projection), got {shortcut!r}.")


class ResNet(ImageClassifier):
    """CIFAR ResNet of He et al. (2016): depth 6n+2, three stages of n basic blocks at widths 16/32/64.

    ResNet-20/56/110 with option-A shortcuts have 0.27M/0.85M/1.7M parameters, as in the paper's Table 6.

    Args:
        depth: 6n+2 weight layers (20, 32, 44, 56, 110, ...).
        width: Multiplier of the stage widths (``width=4`` gives a wide ResNet).
        shortcut: ``"A"`` zero-padding identity shortcuts (the paper's CIFAR choice, no parameters) or
            ``"B"`` 1x1 projection shortcuts where the shape changes.
        preact: Use pre-activation blocks (He et al. 2016b), with a final norm + activation before the head.
        zero_init_residual: Start every residual branch at zero (its last norm scale, or last conv for
            pre-activation), so each block is initially the identity (Goyal et al. 2017).
        norm: ``"batch"``, ``"group"`` or ``"layer"``.
        activation: Nonlinearity inside the blocks.
        init: Initialisation of conv and linear weights.
        **kwargs: Optimizer, scheduler and loss settings of `ImageClassifier`.

    Raises:
        ValueError: If ``depth`` is not 6n+2 or ``width`` is not positive.
    """

    def __init__(
        self,
        depth: int = 20,
        width: float = 1.0,
        shortcut: ShortcutName = "A",
        preact: bool = False,
        zero_init_residual: bool = False,
        norm: ResNetNorm = "batch",
        activation: ActivationName = "relu",
        init: InitName = "kaiming",
        **kwargs: Any,
    ) -> None:
        check_resnet_arguments(depth, width, shortcut)
        super().__init__(**kwargs)

    @override
    def stabilize_variants(self) -> dict[str, Variant]:
        variants = super().stabilize_variants()
        if not self.hparams["zero_init_residual"]:
            words = "every residual branch starting at zero (the block is the identity at initialisation)"
            variants["zero_init_residual"] = Variant(words, {"zero_init_residual": True})
        return variants

    @override
    def build_network(self) -> nn.Module:
        hp = self.hparams
        norm = get_norm_layer(hp["norm"])
        network = CifarResNet(
            resnet_blocks_per_stage(hp["depth"]),
            partial(BasicBlock, norm_layer=norm, preact=hp["preact"]),
            width=hp["width"],
            in_channels=hp["in_channels"],
            num_classes=hp["num_classes"],
            norm=norm,
            activation=get_act_layer(hp["activation"]),
            shortcut_kind=hp["shortcut"],
            preact=hp["preact"],
        )
        init_weights(network, hp["init"], hp["activation"])
        if hp["zero_init_residual"]:
            for block in network.blocks():
                assert isinstance(block, BasicBlock)
                block.zero_init_last()
        return network


class FixupResNet(ImageClassifier):
    """A CIFAR ResNet with no normalization at all, made trainable by Fixup initialisation (Zhang et al. 2019).

    Every residual branch starts at zero and the first conv of each branch is scaled by ``L^{-1/2}`` (L = number
    of branches), so activations and gradients keep their scale through depth without BatchNorm.

    Args:
        depth: 6n+2 weight layers.
        width: Multiplier of the stage widths.
        shortcut: ``"A"`` or ``"B"`` (unnormalized projection).
        activation: Nonlinearity inside the blocks.
        **kwargs: Optimizer, scheduler and loss settings of `ImageClassifier`.
    """

    def __init__(
        self,
        depth: int = 20,
        width: float = 1.0,
        shortcut: ShortcutName = "A",
        activation: ActivationName = "relu",
        **kwargs: Any,
    ) -> None:
        check_resnet_arguments(depth, width, shortcut)
        super().__init__(**kwargs)

    @override
    def build_network(self) -> nn.Module:
        hp = self.hparams
        network = CifarResNet(
            resnet_blocks_per_stage(hp["depth"]),
            FixupBasicBlock,
            width=hp["width"],
            in_channels=hp["in_channels"],
            num_classes=hp["num_classes"],
            norm=None,
            activation=get_act_layer(hp["activation"]),
            shortcut_kind=hp["shortcut"],
        )
        init_weights(network.stem, "kaiming", hp["activation"])
        fixup_init([block for block in network.blocks() if isinstance(block, FixupBasicBlock)], network.head.linear)
        return network
