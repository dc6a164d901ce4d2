"""Every public constructor refuses a non-integer where it takes an integer, and a count out of range, with a
:class:`ConfigurationError` naming the argument (not a torch error deep inside, not a silently odd run)."""

from __future__ import annotations

import inspect
import typing

import pytest

import stabilize.callbacks
import stabilize.datamodules
import stabilize.models
from stabilize.errors import ConfigurationError


def public_classes() -> list[type]:
    found = []
    for package in (stabilize.models, stabilize.datamodules, stabilize.callbacks):
        for name in package.__all__:
            candidate = getattr(package, name)
            # ImageClassifier is the abstract base of the image models: it cannot be built by itself.
            if inspect.isclass(candidate) and candidate is not stabilize.models.ImageClassifier:
                found.append(candidate)
    return found


def integer_arguments() -> list[tuple[type, str]]:
    cases = []
    for cls in public_classes():
        hints = typing.get_type_hints(cls.__init__)
        for name in inspect.signature(cls.__init__).parameters:
            kinds = typing.get_args(hints.get(name)) or (hints.get(name),)
            if int in kinds and float not in kinds:
                cases.append((cls, name))
    return cases


@pytest.mark.parametrize(("cls", "argument"), integer_arguments(), ids=lambda v: getattr(v, "__name__", v))
def test_a_fractional_count_is_refused_by_name(cls: type, argument: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"\b{argument}\b.*1\.5"):
        cls(**{argument: 1.5})


def test_the_sweep_covers_the_argument_families() -> None:
    names = {f"{cls.__name__}.{argument}" for cls, argument in integer_arguments()}
    assert {"DCGAN.n_critic", "CIFAR10DataModule.batch_size", "RecurrentNet.hidden_size", "FastCNN.widths"} <= names


@pytest.mark.parametrize(
    ("cls", "argument", "value"),
    [
        (stabilize.models.DCGAN, "n_critic", 0),
        (stabilize.models.DCGAN, "latent_dim", -1),
        (stabilize.models.DeepPlainCNN, "width", 0),
        (stabilize.models.RecurrentNet, "num_layers", 0),
        (stabilize.datamodules.CIFAR10DataModule, "batch_size", 0),
        (stabilize.datamodules.CIFAR10DataModule, "num_workers", -1),
        (stabilize.datamodules.AddingProblemDataModule, "train_batches", 0),
        (stabilize.callbacks.GradientClipping, "warmup_steps", -1),
        (stabilize.callbacks.GradientHealthCallback, "median_window", 0),
    ],
)
def test_a_count_out_of_range_is_refused_by_name(cls: type, argument: str, value: int) -> None:
    with pytest.raises(ConfigurationError, match=rf"\b{argument}\b"):
        cls(**{argument: value})
