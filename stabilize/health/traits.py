"""What the diagnosis needs to know about a network (`ModelTraits`), the advice a model gives itself
(``gradient_health_hints()``), and the generic remedies for vanishing gradients that fit the model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.PReLU, nn.Mish)
SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid)
NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
#: Endings of the class names of attention modules and transformer blocks in common libraries.
ATTENTION_NAMES = ("Attention", "TransformerBlock", "EncoderLayer", "DecoderLayer")
#: Keys a model's ``gradient_health_hints()`` may use.
HINT_KINDS = ("vanishing", "exploding", "nonfinite", "stalled", "unstable")


@dataclass(frozen=True)
class ModelTraits:
    """What the remedies need to know about a network."""

    normalization: bool = False
    saturating: bool = False
    relu_like: bool = False
    #: A LightningModule with ``automatic_optimization = False``: the Trainer's gradient clipping does not apply.
    manual_optimization: bool = False
    #: Attention modules (``nn.MultiheadAttention``, or a module class named ``*Attention``, ``*TransformerBlock``,
    #: ``*EncoderLayer`` or ``*DecoderLayer``): a transformer, which already has residual connections and
    #: normalization, and whose instabilities QK-norm and z-loss address.
    attention: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> ModelTraits:
        modules = list(module.modules())
        return cls(
            normalization=any(isinstance(m, NORMALIZATION) for m in modules) or any(_is_norm_named(m) for m in modules),
            saturating=any(isinstance(m, SATURATING) for m in modules),
            relu_like=any(isinstance(m, RELU_LIKE) for m in modules),
            manual_optimization=getattr(module, "automatic_optimization", True) is False,
            attention=any(
                isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith(ATTENTION_NAMES) for m in modules
            ),
        )


def _is_norm_named(module: nn.Module) -> bool:
    """Normalization layers of other libraries (RMSNorm of litgpt, a ``LayerNorm`` subclass of timm, ...)."""
    return type(module).__name__.endswith(("Norm", "Norm2d", "NormFp32"))


def model_hints(module: nn.Module | None) -> dict[str, str]:
    """The model's own ``gradient_health_hints()``, checked; empty when it defines none. Keys are a kind of
    `HINT_KINDS`, or ``"<network>/<kind>"`` for the optimizer named ``<network>`` (see `network_hints`)."""
    provider = getattr(module, "gradient_health_hints", None)
    if not callable(provider):
        return {}
    hints = dict(provider())
    unknown = {key for key in hints if key.rsplit("/", 1)[-1] not in HINT_KINDS}
    if unknown:
        raise ValueError(
            f"gradient_health_hints() returned unknown keys {sorted(unknown)}; use {HINT_KINDS}, optionally"
            " prefixed by a network name ('generator/vanishing')."
        )
    return hints


def vanishing_remedies(traits: ModelTraits | None, dead_layers: int = 0) -> list[str]:
    """Generic remedies for vanishing gradients that fit what the model has: normalization, saturation, dead units."""
    if traits is None:
        return [
            "vanishing gradients: add normalization (BatchNorm) and residual connections, use ReLU with He"
            " (kaiming) initialisation"
        ]
    remedies = []
    if dead_layers and traits.relu_like and not traits.saturating:
        remedies.append(
            f"{dead_layers} layer(s) get exactly zero gradient: the ReLU units died, typically after too large"
            " a step (look for spikes before). Lower the learning rate or add a warm-up; LeakyReLU/GELU and"
            " normalization keep units alive; track_activations=True measures the dead fraction"
        )
    if not traits.normalization:
        remedies.append("add normalization (e.g. BatchNorm) after each convolution or linear layer")
    if not traits.attention:  # a transformer has residual connections already
        remedies.append("add residual connections (with or without normalization, e.g. Fixup initialisation)")
    if traits.saturating:
        remedies.append("replace sigmoid/tanh by ReLU-like activations, which do not saturate")
        remedies.append("initialise with He (kaiming) or Xavier scaling instead of a small fixed std")
    elif not dead_layers:
        remedies.append("check the initialisation: He (kaiming) scaling for ReLU-like activations")
    return remedies
