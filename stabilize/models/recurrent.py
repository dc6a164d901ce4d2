"""RecurrentNet: vanilla RNN, LSTM and GRU on sequence tasks, where gradients explode (Pascanu et al. 2013)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from stabilize.errors import ConfigurationError, DataError, check_integers
from stabilize.models.recipe import OptimizerName, SchedulerName, TrainingRecipe
from stabilize.models.variants import Variant

CellName = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
RecurrentInit = Literal["default", "orthogonal", "identity"]
OutputKind = Literal["regression", "classification", "sequence"]


def recurrent_layer(cell: str, input_size: int, hidden_size: int) -> nn.RNNBase:
    """One single-layer recurrent module (batch first)."""
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden_size, batch_first=True, nonlinearity=cell.removeprefix("rnn_"))
    if cell == "lstm":
        return nn.LSTM(input_size, hidden_size, batch_first=True)
    if cell == "gru":
        return nn.GRU(input_size, hidden_size, batch_first=True)
    raise ConfigurationError(f"Unknown cell {cell!r}; expected one of {list(get_args(CellName))}.")


def init_recurrent(layer: nn.RNNBase, scheme: str, gain: float) -> None:
    """Initialise one recurrent layer: ``default`` keeps PyTorch's uniform init; ``orthogonal`` makes every gate's
    recurrent matrix orthogonal (input weights Xavier, biases zero); ``identity`` is the IRNN of Le et al. (2015):
    recurrent matrices the identity, input weights N(0, 0.001^2), biases zero. ``gain`` then scales the recurrent
    matrices: above 1 a ReLU RNN's gradients explode through time, below 1 they vanish."""
    if scheme not in get_args(RecurrentInit):
        raise ConfigurationError(f"Unknown init {scheme!r}; expected one of {list(get_args(RecurrentInit))}.")
    hidden = layer.hidden_size
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("weight_hh"):
                for gate in param.split(hidden):  # one square block per gate (LSTM: 4, GRU: 3, RNN: 1)
                    if scheme == "orthogonal":
                        nn.init.orthogonal_(gate)
                    elif scheme == "identity":
                        gate.copy_(torch.eye(hidden))
                param.mul_(gain)
            elif scheme != "default" and name.startswith("weight_ih"):
                if scheme == "identity":
                    nn.init.normal_(param, std=1e-3)
                else:
                    nn.init.xavier_uniform_(param)
            elif scheme != "default" and name.startswith("bias"):
                nn.init.zeros_(param)


class RecurrentNetwork(nn.Module):
    """Single-layer recurrent modules stacked (``layers.0``, ``layers.1``, ...: one GradientHealthCallback layer
    each, all gate matrices included), optional LayerNorm after each, and a linear head applied at every step.

    ``forward`` returns the head's outputs ``(N, T, output_size)`` and the top layer's states ``(N, T, hidden)``.
    """

    def __init__(
        self, cell: str, input_size: int, hidden_size: int, num_layers: int, output_size: int, layer_norm: bool
    ) -> None:
        super().__init__()
        sizes = [input_size] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(recurrent_layer(cell, a, hidden_size) for a in sizes[:-1])
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) if layer_norm else nn.Identity() for _ in self.layers)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for layer, norm in zip(self.layers, self.norms):
            x = norm(layer(x)[0])
        return self.head(x), x


class RecurrentNet(TrainingRecipe):
    """A recurrent network on a sequence task, with the optimizers and schedules of `TrainingRecipe`.

    ``output="regression"`` predicts one number from the last step (MSE; the adding problem), ``"classification"``
    one class from the last step (cross-entropy and accuracy; sequential CIFAR-10), ``"sequence"`` a class at every
    step (cross-entropy over all steps; the copy task). The top layer's states of the last forward pass are kept in
    `recurrent_states`, which GradientHealthCallback reads to show the gradient over time steps.

    Args:
        input_size: Features per step.
        output_size: 1 for regression, the number of classes otherwise.
        output: ``"regression"``, ``"classification"`` or ``"sequence"``.
        cell: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"`` or ``"gru"``.
        hidden_size: Units per layer.
        num_layers: Stacked recurrent layers.
        init: ``"default"``, ``"orthogonal"`` or ``"identity"`` (see `init_recurrent`).
        recurrent_gain: Multiplies the recurrent matrices after the init (above 1 makes a vanilla RNN explode).
        layer_norm: LayerNorm on each layer's output sequence.
        optimizer: The optimizer, as for `TrainingRecipe` (here Adam by default).
        lr: Peak learning rate (1e-3 by default).
        momentum: SGD/RMSprop momentum.
        nesterov: Nesterov momentum for SGD.
        betas: Adam/AdamW betas.
        weight_decay: Weight decay (none by default).
        scheduler: The learning-rate schedule (constant by default).
        warmup_fraction: Share of the steps spent warming the learning rate up.

    Raises:
        ConfigurationError: For an unknown cell, init or output kind, or a non-positive size or gain.
    """

    def __init__(
        self,
        input_size: int = 2,
        output_size: int = 1,
        output: OutputKind = "regression",
        cell: CellName = "rnn_tanh",
        hidden_size: int = 128,
        num_layers: int = 1,
        init: RecurrentInit = "default",
        recurrent_gain: float = 1.0,
        layer_norm: bool = False,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        scheduler: SchedulerName = "constant",
        warmup_fraction: float = 0.0,
    ) -> None:
        if output not in get_args(OutputKind):
            raise ConfigurationError(f"output must be one of {list(get_args(OutputKind))}, got {output!r}.")
        check_integers(
            1, input_size=input_size, output_size=output_size, hidden_size=hidden_size, num_layers=num_layers
        )
        if not 0 < recurrent_gain < 100:
            raise ConfigurationError(f"recurrent_gain must be in (0, 100), got {recurrent_gain}.")
        if output != "regression" and output_size < 2:
            raise ConfigurationError(f"output={output!r} needs output_size of at least 2 classes.")
        super().__init__(optimizer, lr, momentum, nesterov, betas, weight_decay, scheduler, warmup_fraction)
        self.network = self.build_network()
        self.recurrent_states: Tensor | None = None

    def build_network(self) -> nn.Module:
        """The network mapping ``(N, T, input_size)`` to ``(outputs, states)``; override to try another."""
        hp = self.hparams
        network = RecurrentNetwork(
            hp["cell"], hp["input_size"], hp["hidden_size"], hp["num_layers"], hp["output_size"], hp["layer_norm"]
        )
        for layer in network.layers:
            assert isinstance(layer, nn.RNNBase)
            init_recurrent(layer, hp["init"], hp["recurrent_gain"])
        return network

    @override
    def forward(self, x: Tensor) -> Tensor:
        features = self.hparams["input_size"]
        if x.ndim != 3 or x.shape[-1] != features or not x.is_floating_point():
            raise DataError(
                f"{type(self).__name__} expects float sequences of shape (N, T, {features}); got {x.dtype} of shape"
                f" {tuple(x.shape)}."
            )
        outputs, states = self.network(x)
        self.recurrent_states = states
        if self.hparams["output"] == "sequence":
            return outputs
        last = outputs[:, -1]
        return last.squeeze(-1) if self.hparams["output"] == "regression" else last

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        prediction = self(x)
        kind = self.hparams["output"]
        if kind == "regression":
            loss = F.mse_loss(prediction, y.to(prediction.dtype))
        elif kind == "sequence":
            loss = F.cross_entropy(prediction.flatten(0, 1), y.flatten())
        else:
            loss = F.cross_entropy(prediction, y)
        correct = (prediction.detach().argmax(-1) == y).float().mean() if kind != "regression" else None
        if stage == "train":
            self.log_train("train/loss", loss, len(y), prog_bar=True)
            if correct is not None:
                self.log_train("train/acc", correct, len(y))
            return loss
        self.log(f"{stage}/loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=len(y))
        if correct is not None:
            self.log(f"{stage}/acc", correct, on_epoch=True, batch_size=len(y))
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def stabilize_variants(self) -> dict[str, Variant]:
        variants = super().stabilize_variants()
        if self.hparams["cell"].startswith("rnn"):
            gated = {"cell": "lstm", "init": "default", "recurrent_gain": 1.0}
            variants["gated_cell"] = Variant("an LSTM cell instead of the plain RNN", gated)
        return variants

    @override
    def gradient_health_hints(self) -> dict[str, str]:
        hints = super().gradient_health_hints()
        clip = "for recurrent nets, GradientClipping(method='autoclip' or 'zclip') clips without a hand-picked norm"
        hints["exploding"] = f"{hints['exploding']}; {clip}"
        if self.hparams["cell"].startswith("rnn"):
            hints["vanishing"] = "an LSTM or GRU cell (--model.cell lstm) keeps gradients alive over long sequences"
        return hints
