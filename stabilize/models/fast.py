"""FastCNN: a small BatchNorm CNN with the tricks of the CIFAR-10 speed runs, each one an option of the module."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from stabilize.errors import ConfigurationError
from stabilize.models.base import ImageClassifier
from stabilize.models.blocks import ACTIVATIONS, ConvNormAct, conv3x3

TTAName = Literal["none", "flip", "flip_shift"]


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
        whiten: First layer = frozen whitening filters computed from the first training batch: the eigenvectors of
            the covariance of its 2x2 patches, scaled by the inverse square root of their eigenvalues (and their
            negatives, so a following ReLU/GELU loses nothing). Only its bias trains.
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
        lookahead_decay: Decay of the slow weights per lookahead update.
        tta: Test-time augmentation of validation/test/predict logits: ``"flip"`` averages the image and its
            mirror, ``"flip_shift"`` adds 1-pixel shifted copies (weights 1/2, 1/4, 1/4), one batched forward pass.
        **kwargs: Optimizer, schedule, loss and speed switches of :class:`ImageClassifier` (``label_smoothing``,
            ``nesterov``, ``scheduler="triangular"``, ``channels_last``, ``compile``, ...).
    """

    #: A 2x2 valid convolution and three 2x2 max-pools leave one pixel of a 9x9 image.
    min_image_size = 9

    def __init__(
        self,
        widths: tuple[int, int, int] = (64, 256, 256),
        whiten: bool = True,
        logit_scale: float = 1 / 9,
        bias_lr_multiplier: float = 64.0,
        train_norm_scale: bool = False,
        batchnorm_momentum: float = 0.4,
        decoupled_weight_decay: bool = True,
        lookahead_every: int = 5,
        lookahead_decay: float = 0.95,
        tta: TTAName = "flip_shift",
        **kwargs: Any,
    ) -> None:
        if len(widths) != 3 or min(widths) < 1:
            raise ConfigurationError(f"widths must be three positive channel counts, got {widths}.")
        if logit_scale <= 0 or bias_lr_multiplier <= 0:
            raise ConfigurationError("logit_scale and bias_lr_multiplier must be positive.")
        if lookahead_every < 0 or not 0 < lookahead_decay < 1:
            raise ConfigurationError("lookahead_every must be >= 0 and lookahead_decay in (0, 1).")
        if tta not in get_args(TTAName):
            raise ConfigurationError(f"tta must be 'none', 'flip' or 'flip_shift', got {tta!r}.")
        super().__init__(**kwargs)
        self.whitening_ready: Tensor
        self.register_buffer("whitening_ready", torch.tensor(not whiten))
        self._whitening_checked = not whiten
        self._slow_weights: list[Tensor] | None = None
        self._resumed_slow_weights: list[Tensor] | None = None

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
        return network

    # -------------------------------------------------------------------------------------------- whitening
    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from a batch of (normalized) training images."""
        layer = self.network.get_submodule("0")
        assert isinstance(layer, nn.Conv2d)
        patches = F.unfold(images.float(), kernel_size=layer.kernel_size).transpose(1, 2)
        patches = patches.reshape(-1, patches.shape[-1])
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, *layer.weight.shape[1:])
        layer.weight.copy_(torch.cat([filters, -filters]).to(layer.weight.dtype))
        self.whitening_ready.fill_(True)
        self._whitening_checked = True

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if not self._whitening_checked:
            # One host read, on the first step only (a resumed checkpoint already holds the filters).
            if not bool(self.whitening_ready):
                self.init_whitening(batch[0])
            self._whitening_checked = True
        return super().training_step(batch, batch_idx)

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
        for group in optimizer.param_groups:
            decay = group.get("decoupled_weight_decay", 0.0)
            params = [p for p in group["params"] if p.grad is not None]
            if decay and params:
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    @override
    def on_train_start(self) -> None:
        if self.hparams["lookahead_every"]:
            resumed, self._resumed_slow_weights = self._resumed_slow_weights, None
            self._slow_weights = resumed or [p.detach().clone() for p in self._trainable()]

    @override
    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        every = self.hparams["lookahead_every"]
        if every and self._slow_weights is not None and self.trainer.global_step % every == 0:
            fast = self._trainable()
            torch._foreach_lerp_(self._slow_weights, fast, 1.0 - self.hparams["lookahead_decay"])
            torch._foreach_copy_(fast, self._slow_weights)

    def _trainable_keys(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With lookahead, a checkpoint's ``state_dict`` holds the slow weights, the model ``fit`` would end with had
        it stopped here (so ``last.ckpt`` equals the model after ``fit``), and the fast ones ride along for resuming."""
        super().on_save_checkpoint(checkpoint)
        if self._slow_weights is not None:
            state = checkpoint["state_dict"]
            keys = self._trainable_keys()
            checkpoint["lookahead_fast_weights"] = {key: state[key] for key in keys}
            state.update({key: slow.detach().clone() for key, slow in zip(keys, self._slow_weights)})

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fast = checkpoint.get("lookahead_fast_weights")
        if fast is not None and self._trainer is not None:
            # Resuming fit: train on from the fast weights, with the saved slow weights (not a fresh copy).
            state = checkpoint["state_dict"]
            self._resumed_slow_weights = [state[key].detach().clone() for key in self._trainable_keys()]
            state.update(fast)

    @override
    @torch.no_grad()
    def on_train_end(self) -> None:
        if self._slow_weights is not None:
            torch._foreach_copy_(self._trainable(), self._slow_weights)
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
