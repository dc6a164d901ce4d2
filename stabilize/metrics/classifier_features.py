"""A trained CIFAR-10 classifier as the feature extractor of torchmetrics' FID and Inception Score.

The standard FID and IS use an Inception-v3 trained on ImageNet, whose weights must be downloaded. Where they cannot
be, the same statistics computed on the features of a classifier trained here (the input of its last linear layer;
its logits for the score) still rank generators against each other. Such a *classifier-FID* is only comparable
between runs that use the same classifier checkpoint, never with published FIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from stabilize.datamodules.augment import CIFAR10_MEAN, CIFAR10_STD, normalize_
from stabilize.errors import ConfigurationError

FeatureKind = Literal["features", "logits"]


class ClassifierFeatures(nn.Module):
    """Images in ``[0, 1]`` to the penultimate features (or the logits) of a trained classifier.

    Args:
        classifier: A network whose last `Linear` produces its logits (its input is the feature).
        output: ``"features"`` (for FID) or ``"logits"`` (for the Inception Score, which applies the softmax).
        mean: Per-channel mean the classifier was trained with (images are normalized before it).
        std: Per-channel standard deviation.

    Raises:
        ConfigurationError: If the classifier has no linear layer.

    Example:
        ```python
        features = ClassifierFeatures.from_checkpoint("resnet20.ckpt")
        fid = FrechetInceptionDistance(feature=features, normalize=True)
        ```

    """

    def __init__(
        self,
        classifier: nn.Module,
        output: FeatureKind = "features",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigurationError("ClassifierFeatures needs a classifier whose last layer is an nn.Linear.")
        self.classifier = classifier.eval().requires_grad_(False)
        self.head = linears[-1]
        self.output = output
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_features = self.head.in_features if output == "features" else self.head.out_features

    @classmethod
    def from_checkpoint(cls, path: str | Path, output: FeatureKind = "features") -> ClassifierFeatures:
        """The network of a checkpoint of any `ImageClassifier` subclass (its hyperparameters
        rebuild it; a ResNet-20 from ``configs/resnet20.yaml`` is the reference)."""
        from stabilize.models import ImageClassifier

        path = shipped_classifier() if str(path) == SHIPPED_CLASSIFIER else path
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        model_class = _classifier_class(checkpoint, path)
        # The stabilize command stores its own keys (``_class_path``, ...) beside the arguments.
        arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        model = model_class(**arguments)
        model.load_state_dict(checkpoint["state_dict"])
        assert isinstance(model, ImageClassifier)
        return cls(model.network, output)

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # always the inference behaviour (BatchNorm statistics fixed)

    def forward(self, images: Tensor) -> Tensor:
        x = normalize_(images.float().clone(), self.mean, self.std)
        captured: list[Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.classifier(x)
        finally:
            handle.remove()
        return captured[0].flatten(1) if self.output == "features" else logits


def classifier_quality_metrics(checkpoint: str | Path) -> dict[str, FrechetInceptionDistance | InceptionScore]:
    """``{"classifier_fid": FID, "classifier_is": IS}`` on a classifier's features and logits; both take images in
    ``[0, 1]``. The checkpoint is read once; both metrics share its network."""
    features = ClassifierFeatures.from_checkpoint(checkpoint)
    return {
        "classifier_fid": FrechetInceptionDistance(feature=features, normalize=True),
        "classifier_is": InceptionScore(
            # normalize=False: with it, torchmetrics would turn the images into uint8 before our module sees them.
            feature=ClassifierFeatures(features.classifier, "logits", features.mean, features.std),
            normalize=False,
            splits=1,
        ),
    }


#: The name of the classifier that ships with the package (a ResNet-20 trained here on CIFAR-10, 1.1 MB): pass it
#: wherever a classifier checkpoint is asked for (``SampleQuality(classifier="cifar10-resnet20")``).
SHIPPED_CLASSIFIER = "cifar10-resnet20"


def shipped_classifier() -> Path:
    """The file of `SHIPPED_CLASSIFIER` inside the installed package."""
    return Path(str(resources.files("stabilize") / "assets" / "cifar10-resnet20-classifier.ckpt"))


#: ``quality_metrics("inception")``: the standard metrics, on torch-fidelity's Inception-v3.
STANDARD_INCEPTION = "inception"


def quality_metrics(source: str | Path) -> dict[str, FrechetInceptionDistance | InceptionScore]:
    """FID and Inception Score for images in ``[0, 1]``: on a classifier checkpoint of this project
    (`classifier_quality_metrics`: keys ``classifier_fid``, ``classifier_is``), or, for ``"inception"``, the
    standard ones (keys ``fid``, ``inception_score``), which need the ``torch-fidelity`` package and its Inception
    weights in the local torch hub cache (they cannot be downloaded offline).

    Raises:
        ConfigurationError: If the standard metrics are asked for but the package or the weights are missing.
    """
    if str(source) != STANDARD_INCEPTION:
        return dict(classifier_quality_metrics(source))
    offline = (
        f"Use a classifier of this project instead (e.g. the shipped one, SampleQuality(classifier="
        f"{SHIPPED_CLASSIFIER!r})): its classifier-FID needs no download."
    )
    try:
        return {
            "fid": FrechetInceptionDistance(feature=2048, normalize=True),
            "inception_score": InceptionScore(normalize=True),
        }
    except ModuleNotFoundError as error:
        raise ConfigurationError(
            f"The standard Inception FID needs torch-fidelity: pip install torch-fidelity. {offline}"
        ) from error
    except (OSError, RuntimeError) as error:  # the weights are fetched on first use
        raise ConfigurationError(
            f"The Inception weights of torch-fidelity are not in the local torch hub cache and cannot be fetched"
            f" ({error}). {offline}"
        ) from error


def _classifier_class(checkpoint: dict, path: str | Path) -> type:
    import importlib

    import stabilize.models as models

    hparams = checkpoint.get("hyper_parameters", {})
    class_path = hparams.get("_class_path")
    if isinstance(class_path, str) and class_path.startswith("stabilize.models."):
        module, _, name = class_path.rpartition(".")
        found = getattr(importlib.import_module(module), name)
        if isinstance(found, type) and issubclass(found, models.ImageClassifier):
            return found
    if "depth" in hparams and "shortcut" in hparams:
        return models.FixupResNet if "preact" not in hparams else models.ResNet
    raise ConfigurationError(
        f"{path}: not a checkpoint of an image classifier of this project (train one with configs/resnet20.yaml)."
    )
