"""The structural changes a model declares for ``stabilize doctor`` (its ``stabilize_variants()`` hook): part of the
models, so that declaring them imports nothing of the doctor, the callbacks or the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import LightningModule

#: The structural changes a model may declare in ``stabilize_variants()``, by the finding they address.
VARIANT_KINDS = (
    "normalization",
    "residual",
    "gated_cell",
    "pre_ln",
    "qk_norm",
    "non_saturating_loss",
    "z_loss",
    "zero_init_residual",
    "adamw",
)


@dataclass(frozen=True)
class Variant:
    """A structural change of a model, which the model declares in ``stabilize_variants()`` (a mapping from a kind
    of `VARIANT_KINDS` to a Variant): the same model built with other constructor arguments, or as another
    class. The doctor builds it as ``(model_class or type(model))(**{**model.hparams, **init_args})``, so the model
    must record its arguments with ``save_hyperparameters()``.

    Args:
        description: What changes, in words ("BatchNorm after every convolution").
        init_args: Constructor arguments that differ from the model's.
        model_class: Another LightningModule class taking the same arguments; ``None``: the model's own.
        drop: The model's arguments that ``model_class`` does not take.
    """

    description: str
    init_args: Mapping[str, Any] = field(default_factory=dict)
    model_class: type[LightningModule] | None = None
    drop: tuple[str, ...] = ()

    def build(self, model: LightningModule) -> LightningModule:
        """A new model: ``model``'s class (or `model_class`) with its hyperparameters and `init_args`."""
        arguments = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in self.drop}
        return (self.model_class or type(model))(**{**arguments, **self.init_args})


def declared_variants(model: LightningModule) -> dict[str, Variant]:
    """The model's ``stabilize_variants()``, checked; empty when it declares none."""
    provider = getattr(model, "stabilize_variants", None)
    if not callable(provider):
        return {}
    variants = dict(provider())
    unknown = set(variants) - set(VARIANT_KINDS)
    if unknown:
        raise ValueError(f"stabilize_variants() returned unknown kinds {sorted(unknown)}; use {VARIANT_KINDS}.")
    return {kind: variant for kind, variant in variants.items() if variant is not None}


__all__ = ["VARIANT_KINDS", "Variant", "declared_variants"]
