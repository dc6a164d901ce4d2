"""FastCNN: a small BatchNorm CNN with the tricks of the CIFAR-10 speed runs, each one an option of the module."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from stabilize.errors import ConfigurationError, check_integers
from stabilize.models.base import ImageClassifier
from stabilize.models.blocks import ACTIVATIONS, ConvNormAct, conv3x3

TTAName = Literal["none", "flip", "flip_shift"]
ConvInit = Literal["default", "dirac"]


class Scale(nn.Module):
    """Multiply by a constant (scaled logits: keeps the softmax from saturating early)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def conv_group(in_channels: int, out_channels: int, momentum: float) -> nn.Sequential:
    """conv -> 2x2 max-pool -> BN -> GELU -> (conv -> BN -> GELU): pooling early halves the work of the rest."""

    def norm(channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, momentum=momentum)

    gelu = ACTIVATIONS["gelu"]
    return nn.Sequential(
        conv3x3(in_channels, out_channels),
        nn.MaxPool2d(2),
        norm(out_channels),
        gelu(),
        ConvNormAct(out_channels, out_channels, norm_layer=norm, activation=gelu),
    )


class FastCNN(ImageClassifier):
    """A small BatchNorm CNN in the style of the CIFAR-10 speed-run networks (Page 2018; Jordan 2024).

    Network: a frozen 2x2 patch-whitening convolution (optional), three groups ``conv -> max-pool -> BN -> GELU ->
    conv -> BN -> GELU`` of widths ``widths``, global max pooling and a bias-free linear head whose logits are
    multiplied by ``logit_scale``. Every training trick is an option, so each can be measured on and off:

    Args:
        widths: Output channels of the three conv groups.
        whiten: First layer = frozen whitening filters computed from training images at the first step: the
            eigenvectors of the covariance of their 2x2 patches, scaled by the inverse square root of their
            eigenvalues (and their negatives, so a following ReLU/GELU loses nothing). Only its bias trains.
        whiten_images: How many training images the whitening filters are fitted on: the first ones of the
            datamodule's training split when it offers ``split("train")`` and ``transform_images`` (as
            `CIFAR10DataModule` does), else the first batch.
        whiten_bias_epochs: Freeze the whitening bias after this many epochs (``None``: it trains throughout).
        conv_init: ``"dirac"`` initialises the first ``min(in_channels, out_channels)`` filters of every 3x3
            convolution as the identity (the rest keep PyTorch's default), so each starts close to passing its
            input on (as airbench does).
        logit_scale: Multiplier of the logits.
        bias_lr_multiplier: Learning-rate multiplier of the BatchNorm biases (their weight decay is divided by
            it, so the decay per step stays the same).
        train_norm_scale: Train the BatchNorm scales; the speed runs freeze them at 1.
        batchnorm_momentum: BatchNorm running-statistics momentum (short runs need fast-moving statistics).
        decoupled_weight_decay: With ``optimizer="sgd"``, apply weight decay as ``w -= lr * wd * w`` before each
            step instead of adding it to the gradient (so momentum does not amplify it).
        lookahead_every: Every this many steps, pull the slow (EMA) weights towards the fast ones by
            ``1 - lookahead_decay`` and reset the fast weights to them (Lookahead, Zhang et al. 2019); the slow
            weights are the final ones. 0 disables it.
        lookahead_decay: Decay of the slow weights per lookahead update, reached at the end of training.
        lookahead_ramp: The decay grows as ``lookahead_decay * (step / total_steps) ** lookahead_ramp`` (the speed
            runs use 3: the slow weights follow the fast ones closely early on and average more at the end); 0
            keeps it constant. Lookahead covers all floating-point parameters and buffers (BatchNorm statistics
            too, so the final weights come with matching statistics).
        tta: Test-time augmentation of validation/test/predict logits: ``"flip"`` averages the image and its
            mirror, ``"flip_shift"`` adds 1-pixel shifted copies (weights 1/2, 1/4, 1/4), one batched forward pass.
        **kwargs: Optimizer, schedule, loss and speed switches of `ImageClassifier` (``label_smoothing``,
            ``nesterov``, ``scheduler="triangular"``, ``channels_last``, ``compile``, ...).
    """

    #: A 2x2 valid convolution and three 2x2 max-pools leave one pixel of a 9x9 image.
    min_image_size = 9

    def __init__(
        self,
        widths: tuple[int, int, int] = (64, 256, 256),
        whiten: bool = True,
        whiten_images: int = 5000,
        whiten_bias_epochs: int | None = 3,
        conv_init: ConvInit = "dirac",
        logit_scale: float = 1 / 9,
        bias_lr_multiplier: float = 64.0,
        train_norm_scale: bool = False,
        batchnorm_momentum: float = 0.4,
        decoupled_weight_decay: bool = True,
        lookahead_every: int = 5,
        lookahead_decay: float = 0.95**5,
        lookahead_ramp: float = 3.0,
        tta: TTAName = "flip_shift",
        **kwargs: Any,
    ) -> None:
        if isinstance(widths, (int, float)) or len(widths) != 3:
            raise ConfigurationError(f"widths must be three positive channel counts, got {widths}.")
        check_integers(1, **{f"widths[{i}]": width for i, width in enumerate(widths)}, whiten_images=whiten_images)
        check_integers(0, lookahead_every=lookahead_every, whiten_bias_epochs=whiten_bias_epochs)
        if logit_scale <= 0 or bias_lr_multiplier <= 0:
            raise ConfigurationError("logit_scale and bias_lr_multiplier must be positive.")
        if lookahead_every < 0 or not 0 < lookahead_decay < 1 or lookahead_ramp < 0:
            raise ConfigurationError("lookahead_every must be >= 0, lookahead_decay in (0, 1), lookahead_ramp >= 0.")
        if whiten_images < 1 or (whiten_bias_epochs is not None and whiten_bias_epochs < 0):
            raise ConfigurationError("whiten_images must be positive and whiten_bias_epochs None or >= 0.")
        if conv_init not in get_args(ConvInit):
            raise ConfigurationError(f"conv_init must be 'default' or 'dirac', got {conv_init!r}.")
        if tta not in get_args(TTAName):
            raise ConfigurationError(f"tta must be 'none', 'flip' or 'flip_shift', got {tta!r}.")
        super().__init__(**kwargs)
        self.whitening_ready: Tensor
        self.register_buffer("whitening_ready", torch.tensor(not whiten))
        self._whitening_checked = not whiten
        self._slow_weights: list[Tensor] | None = None
        self._fast_weights: list[Tensor] = []
        self._resumed_slow_weights: list[Tensor] | None = None
        self._total_steps = 1

    @override
    def build_network(self) -> nn.Module:
        hp = self.hparams
        layers: list[nn.Module] = []
        channels = hp["in_channels"]
        if hp["whiten"]:
            whitening = nn.Conv2d(channels, 2 * channels * 4, kernel_size=2, padding=0, bias=True)
            whitening.weight.requires_grad_(False)
            layers += [whitening, ACTIVATIONS["gelu"]()]
            channels = whitening.out_channels
        for width in hp["widths"]:
            layers.append(conv_group(channels, width, hp["batchnorm_momentum"]))
            channels = width
        layers += [
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hp["num_classes"], bias=False),
            Scale(hp["logit_scale"]),
        ]
        network = nn.Sequential(*layers)
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d) and not hp["train_norm_scale"]:
                module.weight.requires_grad_(False)
            if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and hp["conv_init"] == "dirac":
                with torch.no_grad():
                    nn.init.dirac_(module.weight[: module.in_channels])
        return network

    # -------------------------------------------------------------------------------------------- whitening
    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from a batch of (normalized) training images."""
        layer = self.network.get_submodule("0")
        assert isinstance(layer, nn.Conv2d)
        # Called from training_step, i.e. inside autocast: a bf16 covariance would spoil the filters.
        with torch.autocast(images.device.type, enabled=False):
            patches = F.unfold(images.float(), kernel_size=layer.kernel_size).transpose(1, 2)
            patches = patches.reshape(-1, patches.shape[-1])
            patches = patches - patches.mean(0)
            covariance = patches.T @ patches / len(patches)
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, *layer.weight.shape[1:])
        layer.weight.copy_(torch.cat([filters, -filters]).to(layer.weight.dtype))
        self.whitening_ready.fill_(True)
        self._whitening_checked = True
        if self._slow_weights is not None:  # fitted at the first step: lookahead's copy must hold the filters too
            self._slow_weights = [t.clone() for t in self._lookahead_tensors()]

    def whitening_images(self, batch: Tensor) -> Tensor:
        """The images the whitening filters are fitted on (see ``whiten_images``)."""
        count = self.hparams["whiten_images"]
        datamodule: Any = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "split") and hasattr(datamodule, "transform_images"):
            images = datamodule.split("train")[0][:count]
            return datamodule.transform_images(images.to(self.device), train=False)
        return batch[:count]

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if not self._whitening_checked:
            # One host read, on the first step only (a resumed checkpoint already holds the filters).
            if not bool(self.whitening_ready):
                self.init_whitening(self.whitening_images(batch[0]))
            self._whitening_checked = True
        return super().training_step(batch, batch_idx)

    @override
    def on_train_epoch_start(self) -> None:
        epochs = self.hparams["whiten_bias_epochs"]
        if self.hparams["whiten"] and epochs is not None and self.current_epoch >= epochs:
            bias = self.network.get_submodule("0").bias
            assert bias is not None
            bias.requires_grad_(False)

    # ---------------------------------------------------------------------------------- optimizer and lookahead
    @override
    def parameter_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        norm_biases = {id(m.bias) for m in self.modules() if isinstance(m, nn.BatchNorm2d)}
        groups = super().parameter_groups()
        weights, others = groups
        biases = [p for p in others["params"] if id(p) in norm_biases]
        others["params"] = [p for p in others["params"] if id(p) not in norm_biases]
        boosted = {
            "params": biases,
            "lr": hp["lr"] * hp["bias_lr_multiplier"],
            "weight_decay": hp["weight_decay"] / hp["bias_lr_multiplier"],
        }
        groups = [weights, boosted, others]
        if hp["decoupled_weight_decay"] and hp["optimizer"] == "sgd":
            for group in groups:
                group["decoupled_weight_decay"], group["weight_decay"] = group["weight_decay"], 0.0
        return [group for group in groups if group["params"]]

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # One foreach call for every group (a factor per tensor): the per-call cost is what a small net pays.
        params: list[Tensor] = []
        factors: list[float] = []
        for group in optimizer.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            if decay:
                stepped = [p for p in group["params"] if p.grad is not None]
                params += stepped
                factors += [1.0 - group["lr"] * decay] * len(stepped)
        if params:
            torch._foreach_mul_(params, factors)

    def _lookahead_state(self) -> dict[str, Tensor]:
        """The tensors lookahead averages: every floating-point parameter and buffer, by state-dict key."""
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return {name: t for name, t in tensors.items() if t.is_floating_point()}

    def _lookahead_tensors(self) -> list[Tensor]:
        return [t.detach() for t in self._lookahead_state().values()]

    def lookahead_decay_at(self, step: int) -> float:
        """Decay of the slow weights at optimizer step ``step`` (see ``lookahead_ramp``)."""
        hp = self.hparams
        if not hp["lookahead_ramp"]:
            return hp["lookahead_decay"]
        progress = min(step / max(self._total_steps, 1), 1.0)
        return hp["lookahead_decay"] * progress ** hp["lookahead_ramp"]

    @override
    def on_train_start(self) -> None:
        self._total_steps = int(self.trainer.estimated_stepping_batches)
        if self.hparams["lookahead_every"]:
            resumed, self._resumed_slow_weights = self._resumed_slow_weights, None
            # The same tensors all fit long: listed once, not by walking the module every lookahead step.
            self._fast_weights = self._lookahead_tensors()
            self._slow_weights = resumed or [t.clone() for t in self._fast_weights]

    @override
    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        every = self.hparams["lookahead_every"]
        step = self.trainer.global_step
        if every and self._slow_weights is not None and step % every == 0:
            fast = self._fast_weights
            torch._foreach_lerp_(self._slow_weights, fast, 1.0 - self.lookahead_decay_at(step))
            torch._foreach_copy_(fast, self._slow_weights)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With lookahead, a checkpoint's ``state_dict`` holds the slow weights, the model ``fit`` would end with had
        it stopped here (so ``last.ckpt`` equals the model after ``fit``), and the fast ones ride along for resuming."""
        super().on_save_checkpoint(checkpoint)
        if self._slow_weights is not None:
            state = checkpoint["state_dict"]
            keys = list(self._lookahead_state())
            checkpoint["lookahead_fast_weights"] = {key: state[key] for key in keys}
            state.update({key: slow.detach().clone() for key, slow in zip(keys, self._slow_weights)})

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fast = checkpoint.get("lookahead_fast_weights")
        if fast is not None and self._trainer is not None:
            # Resuming fit: train on from the fast weights, with the saved slow weights (not a fresh copy).
            state = checkpoint["state_dict"]
            self._resumed_slow_weights = [state[key].detach().clone() for key in self._lookahead_state()]
            state.update(fast)

    @override
    @torch.no_grad()
    def on_train_end(self) -> None:
        if self._slow_weights is not None:
            torch._foreach_copy_(self._lookahead_tensors(), self._slow_weights)
            self._slow_weights = None
        super().on_train_end()  # the final (slow) weights must be finite

    # ------------------------------------------------------------------------------------ test-time augmentation
    @override
    def evaluation_logits(self, x: Tensor) -> Tensor:
        tta = self.hparams["tta"]
        if tta == "none":
            return self(x)
        views = [x, x.flip(-1)]
        if tta == "flip_shift":
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            views += [padded[..., :-2, :-2], padded[..., 2:, 2:]]
            views += [v.flip(-1) for v in views[2:]]
        logits = self(torch.cat(views)).view(len(views), len(x), -1)
        if tta == "flip":
            return logits.mean(0)
        return 0.5 * logits[:2].mean(0) + 0.5 * logits[2:].mean(0)
