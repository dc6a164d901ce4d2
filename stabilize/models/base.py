"""ImageClassifier: the base class of the image models, everything but the network."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from stabilize.errors import ConfigurationError, DataError, DataTypeError
from stabilize.models.recipe import (
    OptimizerName,
    SchedulerName,
    TrainingRecipe,
    cosine_with_warmup,
    triangular,
)

Stage = Literal["train", "val", "test"]


class ImageClassifier(TrainingRecipe):
    """Base LightningModule of the image models: the optimizers and schedules of `TrainingRecipe`, plus the
    classification loss, metrics and input checks.

    A variant supplies only its network by overriding `build_network`; the arguments of the variant's
    ``__init__`` are available there through ``self.hparams``, because `save_hyperparameters` records the
    arguments of the whole ``__init__`` chain. Every checkpoint therefore reloads with ``load_from_checkpoint``.

    Args:
        num_classes: Number of classes (size of the logits).
        in_channels: Channels of the input images.
        optimizer: The optimizer, see `TrainingRecipe` (as for the next five).
        lr: Peak learning rate.
        momentum: SGD/RMSprop momentum.
        nesterov: Nesterov momentum for SGD.
        betas: Adam/AdamW betas.
        weight_decay: Weight decay.
        scheduler: The learning-rate schedule.
        warmup_fraction: Share of the steps spent warming the learning rate up.
        label_smoothing: Label smoothing of the training loss. Validation and test losses are plain
            cross-entropy so that they stay comparable across runs.
        channels_last: Run the network in ``torch.channels_last`` memory format (faster convolutions on GPUs).
        compile: Compile the network with `torch.compile` once, when the Trainer sets the module up.

    Raises:
        ValueError: If a numeric argument is out of range.
    """

    #: A base to build on, not one to train: ``stabilize --help`` leaves it out of its list of classes.
    abstract_base = True

    #: Spatial size the network insists on, or ``None`` when any size works.
    expected_image_size: int | None = None
    #: Smallest height and width the network accepts (its pooling needs at least one pixel at the end).
    min_image_size: int = 1
    _nonfinite_input_batches: Tensor

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 5e-4,
        scheduler: SchedulerName = "cosine",
        warmup_fraction: float = 0.0,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        checks = [
            (num_classes >= 2, f"num_classes must be at least 2, got {num_classes}."),
            (in_channels >= 1, f"in_channels must be positive, got {in_channels}."),
            (0 <= label_smoothing < 1, f"label_smoothing must be in [0, 1), got {label_smoothing}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(message)
        super().__init__(optimizer, lr, momentum, nesterov, betas, weight_decay, scheduler, warmup_fraction)
        self.network = self.build_network()
        if not isinstance(self.network, nn.Module):
            raise TypeError(f"{type(self).__name__}.build_network() must return an nn.Module, got {self.network!r}.")
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        # Training accuracy is one comparison on the device per step (log_train); torchmetrics' per-call Python and
        # its target validation (torch.unique, a host read) stay out of the training hot path.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        size = self.expected_image_size or 32
        self.example_input_array = torch.zeros(2, in_channels, size, size)
        # Counts batches with NaN/Inf pixels on the device; read (one sync) only every log_every_n_steps.
        self.register_buffer("_nonfinite_input_batches", torch.zeros((), dtype=torch.long), persistent=False)
        self._compiled_network: Any = None
        self._smoothing_table: Tensor | None = None

    def build_network(self) -> nn.Module:
        """Return the network mapping images ``(N, C, H, W)`` to logits ``(N, num_classes)``.

        Override this in a subclass; read the subclass's own ``__init__`` arguments from ``self.hparams``.
        """
        raise NotImplementedError(f"{type(self).__name__} must override build_network() to return its network.")

    # ----------------------------------------------------------------------------------------------------- forward
    def check_input(self, x: Tensor) -> None:
        """Fail at once, with what was expected, on an input of the wrong type, rank, channel count or dtype.

        Only metadata is inspected here, so the check costs no device synchronisation.
        """
        name = type(self).__name__
        channels = self.hparams["in_channels"]
        if not isinstance(x, Tensor):
            raise DataTypeError(f"{name} expects a torch.Tensor of images, got {type(x).__name__}.")
        if x.ndim != 4:
            raise DataError(
                f"{name} expects a batch of images of shape (N, {channels}, H, W); got shape {tuple(x.shape)}"
                f" ({x.ndim} dimensions). Add a batch dimension with x.unsqueeze(0) for a single image."
            )
        if x.shape[1] != channels:
            raise DataError(
                f"{name} expects {channels} input channels (N, {channels}, H, W); got shape {tuple(x.shape)}."
                " Channels-last data must be permuted to (N, C, H, W) first."
            )
        if not x.is_floating_point():
            raise DataTypeError(
                f"{name} expects floating-point images, got dtype {x.dtype}. Convert and normalize first, e.g."
                " x.float() / 255 followed by per-channel normalization (CIFAR10DataModule does this)."
            )
        weight_dtype = next(self.network.parameters()).dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise DataTypeError(
                f"{name} holds {weight_dtype} weights but got {x.dtype} images. Convert the input"
                f" (x.to({weight_dtype})) or the model (model.to(dtype)), or train with a Trainer precision setting"
                " such as 'bf16-mixed'."
            )
        if min(x.shape[-2:]) < self.min_image_size:
            raise DataError(
                f"{name} needs images of at least {self.min_image_size}x{self.min_image_size} pixels (its pooling"
                f" halves them several times); got shape {tuple(x.shape)}."
            )
        size = self.expected_image_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            raise DataError(f"{name} expects {size}x{size} images; got shape {tuple(x.shape)}.")

    @override
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if self.hparams["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        network = self._compiled_network if self._compiled_network is not None else self.network
        return network(x)

    @override
    def setup(self, stage: str) -> None:
        # Data and model that disagree on the classes fail here, with both numbers, not in the loss later.
        datamodule = getattr(self._trainer, "datamodule", None)
        classes = getattr(datamodule, "num_classes", None)
        if isinstance(classes, int) and classes != self.hparams["num_classes"]:
            raise ConfigurationError(
                f"{type(datamodule).__name__} has {classes} classes but {type(self).__name__} was built with"
                f" num_classes={self.hparams['num_classes']}: set --model.num_classes {classes}."
            )

    @override
    def configure_model(self) -> None:
        # Compile once per module instance, outside the registered modules, so checkpoints keep plain keys.
        if self.hparams["compile"] and self._compiled_network is None:
            # object.__setattr__: an nn.Module attribute would be registered, duplicating every weight in the
            # state dict under "_compiled_network._orig_mod."; the compiled wrapper shares the same parameters.
            object.__setattr__(self, "_compiled_network", torch.compile(self.network))

    # ------------------------------------------------------------------------------------------------------ steps
    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: Stage) -> Tensor:
        x, y = batch
        # x * 0 is 0 at every finite pixel and NaN at NaN and +-inf, so its sum is NaN exactly when some pixel is not
        # finite (a sum of zeros cannot overflow); a quarter of the time of ~isfinite(x).all() on a small batch. In
        # place: assigning a buffer goes through Module.__setattr__ every step.
        self._nonfinite_input_batches.add_((x * 0).sum().isnan())
        logits = self(x) if stage == "train" else self.evaluation_logits(x)
        smoothed = stage == "train" and self.hparams["label_smoothing"] > 0
        loss = F.cross_entropy(logits, self._smoothed_targets(y, logits) if smoothed else y)
        if stage == "train":
            self.log_train("train/loss", loss, len(y), prog_bar=True)
            self.log_train("train/acc", (logits.detach().argmax(-1) == y).float().mean(), len(y))
            return loss
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits.detach(), y)
        self.log(f"{stage}/loss", loss.detach(), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)
        return loss

    def _smoothed_targets(self, y: Tensor, logits: Tensor) -> Tensor:
        """The label-smoothed target rows of ``y``, looked up in a table kept per device and dtype: ``label_smoothing=``
        builds them from several ops at every step, about twice the loss's cost forward and backward on a small batch
        (16 images, 10 classes: docs/guide/benchmarks.md, host overhead); the gradient is the same to rounding."""
        # float32 at least: under autocast the loss runs in float32, and bf16 would round 0.82 to 0.8203.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        table = self._smoothing_table
        if table is None or table.device != logits.device or table.dtype != dtype:
            smoothing, classes = self.hparams["label_smoothing"], self.hparams["num_classes"]
            table = torch.full((classes, classes), smoothing / classes, device=logits.device, dtype=dtype)
            table.diagonal().add_(1 - smoothing)
            self._smoothing_table = table
        return table.index_select(0, y)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the logits of the images in ``batch`` (an ``(x, y)`` pair or a bare image tensor)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.evaluation_logits(x)

    def evaluation_logits(self, x: Tensor) -> Tensor:
        """Logits used for validation, test and predict; override for test-time augmentation."""
        return self(x)

    # ------------------------------------------------------------------------------------- non-finite input check
    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        # Lightning's logger connector sets Trainer.log_every_n_steps at run time (it is not a typed attribute).
        interval = max(getattr(self._trainer, "log_every_n_steps", 1), 1)
        if self._trainer is not None and (batch_idx + 1) % interval == 0:
            self._raise_on_nonfinite_inputs()

    @override
    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._raise_on_nonfinite_inputs()

    @override
    def on_validation_epoch_end(self) -> None:
        self._raise_on_nonfinite_inputs()

    @override
    def on_test_epoch_end(self) -> None:
        self._raise_on_nonfinite_inputs()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # NaN pixels counted since the last check must stop the run before they reach a checkpoint.
        self._raise_on_nonfinite_inputs()

    def _raise_on_nonfinite_inputs(self) -> None:
        count = int(self._nonfinite_input_batches.item())
        if count:
            self._nonfinite_input_batches.zero_()
            step = self.trainer.global_step if self._trainer is not None else "?"
            raise DataError(
                f"{count} input batch(es) seen up to global step {step} contain NaN or Inf pixels. The data, not"
                " the model, is broken: check the dataset files and the normalization (a zero std divides by zero)."
            )


__all__ = ["ImageClassifier", "OptimizerName", "SchedulerName", "cosine_with_warmup", "triangular"]
