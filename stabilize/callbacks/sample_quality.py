"""SampleQuality: FID and Inception Score of a generative model's samples against the test images."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from typing_extensions import override

from stabilize.errors import ConfigurationError
from stabilize.metrics import SHIPPED_CLASSIFIER, quality_metrics


@runtime_checkable
class ImageGenerator(Protocol):
    """What `SampleQuality` needs of a LightningModule: ``count`` fresh samples, images in ``[0, 1]`` of the
    test images' shape, on the module's device (`DCGAN` implements it)."""

    def generate_images(self, count: int) -> Tensor: ...


class SampleQuality(Callback):
    """Measure a generative model's samples during ``test``: the FID between the test images and as many generated
    ones, and the Inception Score of the generated ones, on the features of a classifier trained with this project
    (a *classifier*-FID and -IS, comparable between runs that use the same checkpoint, never with published FIDs) or
    on torch-fidelity's Inception-v3 (``classifier="inception"``, where its weights are present locally).

    The metrics are an evaluation concern, so they live here and not in the model: any LightningModule that implements
    `ImageGenerator` can be measured, and the classifier never enters the model's checkpoints. The test batches
    must hold images in ``[0, 1]`` (an ``(images, labels)`` pair or the images alone), e.g.
    ``CIFAR10DataModule(normalize=False)``.

    Args:
        classifier: A classifier checkpoint of this project (a path, or ``"cifar10-resnet20"``, the one that ships
            with the package), or ``"inception"`` for the standard metrics.
        samples: Real test images, and as many generated ones, per process; the rest of the test set is skipped.
        prefix: Prefix of the logged keys.

    Raises:
        ConfigurationError: If ``samples`` is not a positive integer; when testing starts, if the module does not
            implement `ImageGenerator` or the classifier cannot be read.

    Example:
        ```python
        trainer = Trainer(callbacks=[SampleQuality("cifar10-resnet20", samples=5000)])
        trainer.test(dcgan, CIFAR10DataModule(normalize=False, augment=False, val_size=0))

        # the command line: stabilize test --config dcgan --ckpt_path <checkpoint> \\
        #     --trainer.callbacks+=SampleQuality --trainer.callbacks.classifier=cifar10-resnet20
        ```

    Logged at the end of ``test``:

    | key | value |
    |---|---|
    | ``gan/classifier_fid``, ``gan/classifier_is`` | FID and IS on a classifier checkpoint's features and logits |
    | ``gan/fid``, ``gan/inception_score`` | the standard FID and Inception Score (``classifier="inception"``) |
    """

    def __init__(self, classifier: str = SHIPPED_CLASSIFIER, samples: int = 5000, prefix: str = "gan/") -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigurationError(f"SampleQuality needs a positive integer number of samples, got {samples!r}.")
        self.classifier = str(classifier)
        self.samples = samples
        self.prefix = prefix
        self.metrics: dict[str, Metric] = {}
        self.measured = 0  # real images (and as many generated ones) fed to the metrics in this test

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, ImageGenerator):
            raise ConfigurationError(
                f"SampleQuality measures generated images: {type(pl_module).__name__} has no"
                " generate_images(count) method returning images in [0, 1]."
            )
        if not self.metrics:  # the classifier is read once, at the first test
            self.metrics = dict(quality_metrics(self.classifier))
        for metric in self.metrics.values():
            metric.reset()
            metric.to(pl_module.device)
        self.measured = 0

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.measured >= self.samples:
            return
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        real = images[: self.samples - self.measured]
        with torch.no_grad():
            fake = pl_module.generate_images(len(real))  # type: ignore[operator]
        for metric in self.metrics.values():
            if isinstance(metric, FrechetInceptionDistance):
                metric.update(real, real=True)
                metric.update(fake, real=False)
            else:  # an Inception Score looks at the generated images only
                metric.update(fake)
        self.measured += len(real)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, metric in self.metrics.items():
            value = metric.compute()
            # InceptionScore returns (mean, std); the std over one split is meaningless.
            pl_module.log(f"{self.prefix}{name}", (value if isinstance(value, Tensor) else value[0]).float())
