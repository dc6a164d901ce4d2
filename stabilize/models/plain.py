"""Plain (shortcut-free) convolutional networks: the seed ConvNet, the fragile deep baseline, its normalized twin."""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from stabilize.errors import ConfigurationError, check_integers
from stabilize.models.base import ImageClassifier
from stabilize.models.blocks import (
    STAGE_WIDTHS,
    ActivationName,
    ClassifierHead,
    ConvNormAct,
    InitName,
    NormLayer,
    NormName,
    get_act_layer,
    get_norm_layer,
    init_weights,
)
from stabilize.models.variants import Variant

MIN_PLAIN_DEPTH = 5  # stem + one conv per stage + head


class PlainCNN(ImageClassifier):
    """The seed article's ConvNet, corrected: five 3x3 convs 3-64-64-128-128-256, each followed by a 2x2
    max-pool (32 -> 1 pixels), then a linear head 256 -> ``num_classes`` with no activation on the logits.

    Args:
        activation: Nonlinearity after every convolution.
        init: Weight initialisation (see `stabilize.models.blocks.init_weights`).
        lr: Peak learning rate. 0.01, not the base class's 0.1: without normalization this net diverges to NaN
            within a few steps at 0.1 with SGD and momentum.
        **kwargs: Optimizer, scheduler and loss settings of `ImageClassifier`.
    """

    widths = (64, 64, 128, 128, 256)
    expected_image_size = 32

    def __init__(
        self, activation: ActivationName = "relu", init: InitName = "kaiming", lr: float = 0.01, **kwargs: Any
    ) -> None:
        super().__init__(lr=lr, **kwargs)

    @override
    def build_network(self) -> nn.Module:
        hp = self.hparams
        act = get_act_layer(hp["activation"])
        layers: list[nn.Module] = []
        in_channels = hp["in_channels"]
        for width in self.widths:
            layers += [ConvNormAct(in_channels, width, activation=act), nn.MaxPool2d(2)]
            in_channels = width
        layers += [nn.Flatten(), nn.Linear(in_channels, hp["num_classes"])]
        network = nn.Sequential(*layers)
        init_weights(network, hp["init"], hp["activation"])
        return network


def stage_depths(num_convs: int, num_stages: int = len(STAGE_WIDTHS)) -> list[int]:
    """Spread ``num_convs`` convolutions as evenly as possible over the stages (earlier stages get the extra)."""
    base, extra = divmod(num_convs, num_stages)
    return [base + (stage < extra) for stage in range(num_stages)]


def plain_network(
    depth: int,
    in_channels: int,
    num_classes: int,
    activation: str,
    norm: NormLayer | None,
    width: int = 1,
) -> nn.Sequential:
    """A VGG-style network of ``depth`` weight layers (convs + the linear head) in three stages of width
    16/32/64 (times ``width``), halving the resolution at the start of stages 2 and 3: the "plain" networks of
    He et al. (2016), Fig. 6, which ResNets of the same depth add shortcuts to.
    """
    act = get_act_layer(activation)
    widths = [w * width for w in STAGE_WIDTHS]
    layers: list[nn.Module] = [ConvNormAct(in_channels, widths[0], norm_layer=norm, activation=act)]
    channels = widths[0]
    for stage, (stage_width, convs) in enumerate(zip(widths, stage_depths(depth - 2))):
        for index in range(convs):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(ConvNormAct(channels, stage_width, stride, norm_layer=norm, activation=act))
            channels = stage_width
    layers.append(ClassifierHead(channels, num_classes))
    return nn.Sequential(*layers)


class DeepPlainCNN(ImageClassifier):
    """The fragile baseline: a deep plain CNN with no shortcuts and no normalization.

    ``depth`` counts weight layers, as the ResNet names do: ``depth - 1`` convolutions plus the linear head, so
    ``DeepPlainCNN(depth=56)`` is the "plain-56" that He et al. compare ResNet-56 against. Deep + ``sigmoid`` +
    ``small_normal`` init makes the gradients of the early layers vanish by orders of magnitude.

    Args:
        depth: Number of weight layers (at least 5).
        activation: Nonlinearity after every convolution.
        init: Weight initialisation scheme.
        width: Multiplier of the stage widths 16/32/64.
        init_scale: Multiply the initial weights by this; above 1 every layer amplifies its input, so gradients
            explode with depth (``configs/exploding_relu.yaml``: 1.5 at depth 20).
        **kwargs: Optimizer, scheduler and loss settings of `ImageClassifier`.

    Raises:
        ValueError: If ``depth`` or ``width`` is too small.
    """

    def __init__(
        self,
        depth: int = 20,
        activation: ActivationName = "relu",
        init: InitName = "kaiming",
        width: int = 1,
        init_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if depth < MIN_PLAIN_DEPTH:
            raise ConfigurationError(f"depth must be at least {MIN_PLAIN_DEPTH} (stem + 3 stages + head), got {depth}.")
        check_integers(1, width=width)
        if not 0 < init_scale < 100:
            raise ConfigurationError(f"init_scale must be in (0, 100), got {init_scale}.")
        super().__init__(**kwargs)

    def normalization(self) -> NormLayer | None:
        """Normalization after every conv; the plain baseline has none."""
        return None

    @override
    def stabilize_variants(self) -> dict[str, Variant]:
        variants = super().stabilize_variants()
        if self.normalization() is None:
            variants["normalization"] = Variant("BatchNorm after every convolution", {"norm": "batch"}, BatchNormCNN)
        depth = self.hparams["depth"]
        if (depth - 2) % 6 == 0:
            from stabilize.models.resnet import ResNet

            variants["residual"] = Variant(
                f"ResNet-{depth}: residual connections (and BatchNorm)",
                {"depth": depth},
                ResNet,
                drop=("init_scale", "width", "norm"),
            )
        return variants

    @override
    def gradient_health_hints(self) -> dict[str, str]:
        hints = super().gradient_health_hints()
        if self.normalization() is None:
            hints["vanishing"] = (
                "in this collection, BatchNormCNN (normalization) and ResNet (residual connections) are this network"
                " with the fix, at the same depth"
            )
        return hints

    @override
    def build_network(self) -> nn.Module:
        hp = self.hparams
        network = plain_network(
            hp["depth"], hp["in_channels"], hp["num_classes"], hp["activation"], self.normalization(), hp["width"]
        )
        init_weights(network, hp["init"], hp["activation"], hp["init_scale"])
        return network


class BatchNormCNN(DeepPlainCNN):
    """`DeepPlainCNN` with a normalization layer after every convolution (and no shortcuts).

    Args:
        norm: ``"batch"`` (BatchNorm), ``"group"`` (GroupNorm, 8 groups) or ``"layer"`` (GroupNorm, 1 group).
        **kwargs: ``depth``, ``activation``, ``init``, ``width`` of `DeepPlainCNN` and the settings of
            `ImageClassifier`.
    """

    def __init__(self, norm: NormName = "batch", **kwargs: Any) -> None:
        if norm == "none":
            raise ConfigurationError(
                "BatchNormCNN needs a normalization; use DeepPlainCNN for the unnormalized network."
            )
        super().__init__(**kwargs)

    @override
    def normalization(self) -> NormLayer | None:
        return get_norm_layer(self.hparams["norm"])
