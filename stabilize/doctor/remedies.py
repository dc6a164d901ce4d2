"""The remedies the doctor tries, and the order it tries them in for each finding.

A `Remedy` is a change to a run that needs nothing from the model's code: callbacks added to the Trainer
(a lower learning rate, a warm-up, a re-initialisation, swapped activation modules, clipping), Trainer arguments, or
a `Variant` the model declares itself (a structural change: normalization, residual connections, a gated
cell, pre-LN, QK-norm, a non-saturating GAN loss, another optimizer). `plan` orders them for a probe's
findings: cheap before structural, most likely first; each entry is a *family* of escalating steps (a learning rate
10x, then 100x lower) that the doctor climbs until a step repairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback

from stabilize.callbacks.gradient_clipping import GradientClipping
from stabilize.callbacks.learning_rate_scale import LearningRateScale
from stabilize.callbacks.reinitialize import Reinitialize
from stabilize.callbacks.swap_activations import SwapActivations
from stabilize.callbacks.swap_optimizer import SwapOptimizer
from stabilize.health.diagnosis import vanishing_through_time
from stabilize.health.diagnosis import verdict_class as class_of
from stabilize.health.records import HealthSummary
from stabilize.health.traits import ModelTraits
from stabilize.models.variants import Variant


@dataclass(frozen=True)
class Remedy:
    """One change to a run: callbacks (class and arguments) and Trainer arguments to add, or a model variant.

    Args:
        name: Short name for the table ("LR x0.1").
        kind: ``"training"``, ``"initialisation"`` or ``"structure"``.
        callbacks: ``(class, arguments)`` of the callbacks to add, in order.
        trainer: Trainer arguments to set.
        variant: The model variant to train instead (structure).
        tolerates: Verdict classes a repaired run may still show: clipping bounds the step, not the gradient the
            health callback measures before it, so a clipped run whose loss learns is repaired while its raw
            gradient still reads exploding.
    """

    name: str
    kind: str
    callbacks: tuple[tuple[type[Callback], Mapping[str, Any]], ...] = ()
    trainer: Mapping[str, Any] = field(default_factory=dict)
    variant: Variant | None = None
    tolerates: frozenset[str] = frozenset()

    def make_callbacks(self) -> list[Callback]:
        return [cls(**arguments) for cls, arguments in self.callbacks]

    def python(self) -> str:
        """The change as Python: what to pass to the Trainer or build instead of the model."""
        parts = [f"{cls.__name__}({_arguments(arguments)})" for cls, arguments in self.callbacks]
        words = [f"Trainer(callbacks=[..., {', '.join(parts)}])"] if parts else []
        words += [f"Trainer({_arguments(self.trainer)})"] if self.trainer else []
        if self.variant is not None:
            built = self.variant.model_class.__name__ if self.variant.model_class else "the model"
            words.append(f"{built} with {_arguments(self.variant.init_args)} ({self.variant.description})")
        return "; ".join(words)

    def __add__(self, other: Remedy) -> Remedy:
        """Both changes at once (a combination, tried when single remedies fail)."""
        if self.variant is not None and other.variant is not None:
            raise ValueError("two model variants cannot be combined")
        return Remedy(
            f"{self.name} + {other.name}",
            "structure" if "structure" in (self.kind, other.kind) else self.kind,
            self.callbacks + other.callbacks,
            {**self.trainer, **other.trainer},
            self.variant or other.variant,
            self.tolerates | other.tolerates,
        )


def _arguments(arguments: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items())


# --------------------------------------------------------------------------------------------------- the catalogue
def learning_rate(factor: float, optimizers: Sequence[tuple[int, str]] = ()) -> Remedy:
    """The learning rate times ``factor``: of every optimizer, or of ``optimizers`` only (index, name)."""
    words = f"x{factor:g}" if factor > 1 else f"/{1 / factor:g}"
    if not optimizers:
        return Remedy(f"LR {words}", "training", ((LearningRateScale, {"factor": factor}),))
    names = ", ".join(name for _, name in optimizers)
    indices = [index for index, _ in optimizers]
    return Remedy(
        f"LR {words} ({names})", "training", ((LearningRateScale, {"factor": factor, "optimizers": indices}),)
    )


def warmup(steps: int) -> Remedy:
    return Remedy(f"warm-up {steps} steps", "training", ((LearningRateScale, {"warmup_steps": steps}),))


def clipping(max_norm: float = 1.0) -> Remedy:
    # The callback rather than Trainer(gradient_clip_val): it also clips under manual optimization (GANs).
    return Remedy(
        f"clip norm {max_norm:g}",
        "training",
        ((GradientClipping, {"method": "norm", "max_norm": max_norm}),),
        tolerates=frozenset({"exploding"}),
    )


def reinitialisation(scheme: str = "auto") -> Remedy:
    return Remedy(f"re-init {scheme}", "initialisation", ((Reinitialize, {"scheme": scheme}),))


def activation_swap(to: str, scheme: str) -> Remedy:
    return Remedy(
        f"{to} + {scheme} init",
        "initialisation",
        ((SwapActivations, {"to": to}), (Reinitialize, {"scheme": scheme})),
    )


def optimizer_swap(to: str = "adamw") -> Remedy:
    return Remedy(f"{to} instead of sgd", "training", ((SwapOptimizer, {"to": to}),))


def bf16() -> Remedy:
    # fp16's 5-bit exponent overflows where bf16's 8 bits (float32's range) do not: the cure for fp16-only NaNs.
    return Remedy("bf16 instead of fp16", "training", trainer={"precision": "bf16-mixed"})


def variant(kind: str, declared: Mapping[str, Variant]) -> Remedy:
    return Remedy(kind.replace("_", " "), "structure", variant=declared[kind])


@dataclass(frozen=True)
class Findings:
    """What the probe found, as the plan needs it."""

    verdict_class: str
    #: The first step of an explosion or non-finite gradient (None: none).
    explosion_step: int | None = None
    dead_units: bool = False
    through_time: bool = False
    #: The loss stalled too (the loss-stall rule fired on a single-optimizer run).
    stalled_loss: bool = False
    #: The run trains with plain SGD (with or without momentum), which AdamW may replace.
    sgd: bool = False
    #: (index, name) of each optimizer whose gradient collapsed, in a run with several (a GAN's generator).
    collapsed: tuple[tuple[int, str], ...] = ()

    @classmethod
    def of(
        cls, verdict_class: str, summaries: Mapping[str, HealthSummary], optimizers: tuple[str, ...] = ()
    ) -> Findings:
        """The findings of a probe: its verdict class, its health summaries (in optimizer order, as
        `GradientHealthCallback.summary` gives them) and its optimizers' class names."""
        firsts = [
            step
            for s in summaries.values()
            for step in [*(e["first_step"] for e in s["explosions"]), *(e["first_step"] for e in s["nonfinite"])]
        ]
        return cls(
            verdict_class,
            min(firsts) if firsts else None,
            any(s.get("dead_units") for s in summaries.values()),
            any(vanishing_through_time(s) for s in summaries.values()),
            any(s.get("loss_stall") for s in summaries.values()),
            "SGD" in optimizers,
            # Positions are optimizer indices only when every optimizer stepped (each has its summary).
            tuple(
                (index, name)
                for index, (name, summary) in enumerate(summaries.items())
                if len(summaries) > 1 and len(summaries) == len(optimizers) and class_of(summary) == "collapse"
            ),
        )


def plan(
    findings: Findings, traits: ModelTraits, declared: Mapping[str, Variant], steps: int, fp16: bool = False
) -> list[list[Remedy]]:
    """The families of remedies to try for ``findings``, in order (see the module's docstring). ``steps``: the probe
    budget, which sets the warm-up's length (a fifth of it); ``fp16``: the run trains in float16 mixed precision."""
    kind = findings.verdict_class

    def structure(*kinds: str) -> list[list[Remedy]]:
        return [[variant(k, declared)] for k in kinds if k in declared]

    # A transformer is not re-initialised wholesale: its embeddings, norms and scaled residual branches have
    # initialisations of their own that a generic scheme would undo.
    reinit = [] if traits.attention else [[reinitialisation()]]
    lower = [[learning_rate(0.1), learning_rate(0.01)]]
    warm = [[warmup(max(10, steps // 5))]]
    half = [[bf16()]] if fp16 else []
    # AdamW instead of SGD: the model's own variant where it declares one (it knows its rate), else the swap.
    adaptive = structure("adamw") or ([[optimizer_swap()]] if findings.sgd else [])
    # A short range test: 10x up at a time, on while the loss keeps falling further (LR x10 to x10,000).
    raising = [[learning_rate(10.0**k) for k in range(1, 5)]]
    if kind == "exploding":
        from_start = findings.explosion_step is not None and findings.explosion_step < max(10, steps // 10)
        first = [*reinit, *structure("zero_init_residual"), [clipping()]] if from_start else [[clipping()], *lower]
        rest = [*lower, *warm] if from_start else [*warm, *reinit]
        return [*half, *first, *rest, *adaptive, *structure("normalization", "residual", "gated_cell")]
    if kind == "unstable":
        structural = structure("qk_norm", "z_loss", "pre_ln", "normalization")
        return [*lower, *warm, [clipping()], *structural, *half, *adaptive]
    if kind == "vanishing":
        families: list[list[Remedy]] = []
        if findings.through_time:
            families += [*structure("gated_cell"), *reinit, [clipping()]]
        elif findings.dead_units:
            families += [*reinit, *lower]
        elif traits.attention:  # a post-LN transformer without warm-up stalls with its early layers silent
            families += [*warm, *structure("pre_ln"), *lower]
        if traits.saturating:
            families += [[activation_swap("relu", "he")], [activation_swap("selu", "lecun")]]
        if not (findings.through_time or findings.dead_units or traits.attention):
            families += reinit
        # A vanishing gradient whose loss stalled may be a step too small rather than a signal lost: Adam at 10x
        # the LR teaches a tanh RNN to recall a token 60 steps back that neither re-initialisation nor clipping
        # does (the repair bench's rnn-through-time). After the changes that address the gradient itself.
        stalled = raising if findings.stalled_loss else []
        return [*families, *stalled, *structure("normalization", "residual")]
    if kind == "collapse":
        # In a run of several optimizers (a GAN), the network whose gradient collapsed is outpaced by the other: after
        # the loss that does not saturate, a faster one (its LR x10, x100), the other's left as it is. Measured on the
        # repair bench's minimax GAN (3,000 steps; the bar: within 1.0 of the data's mean): the generator's LR x10
        # ends 0.10 off, x100 0.63, the discriminator's /10 8.29 (8.50 as configured).
        faster = [[learning_rate(10.0**k, findings.collapsed) for k in (1, 2)]] if findings.collapsed else []
        return [*structure("non_saturating_loss"), *faster, *lower, [clipping()], *structure("normalization")]
    if kind == "stalled":
        return [*raising, *adaptive, *reinit]
    return []


__all__ = ["Findings", "Remedy", "plan"]
