"""GradientHealthCallback: per-layer vanishing/exploding gradient statistics, diagnosed in plain words."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

NonFinitePolicy = Literal["warn", "skip", "raise"]

_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.PReLU, nn.Mish)
_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid)
_NORMALIZATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_HISTOGRAM_BINS = 64
# Device accumulators between logging steps (read together with the layer statistics, in this order).
_COUNTERS = (
    "exploding",
    "exploding_first",
    "exploding_last",
    "exploding_max",
    "nonfinite_tensors",
    "nonfinite_first",
    "nonfinite_last",
    "amp_skipped",
)


@dataclass
class _Layers:
    """The layers one optimizer updates: modules that directly own parameters, in forward order."""

    names: list[str]
    params: list[Tensor]
    layer_of_param: list[int]
    index_cache: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)

    def layer_index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        """Layer of each listed parameter, as a device tensor cached per parameter subset (no per-step copy)."""
        key = (*positions, str(device))
        if key not in self.index_cache:
            self.index_cache[key] = torch.tensor([self.layer_of_param[p] for p in positions], device=device)
        return self.index_cache[key]

    def per_layer_norms(self, positions: tuple[int, ...], norms: Tensor) -> Tensor:
        """Combine the L2 norms of the listed parameters into one L2 norm per layer (0 for absent layers)."""
        index = self.layer_index(positions, norms.device)
        return torch.zeros(len(self.names), device=norms.device).index_add_(0, index, norms.square()).sqrt()

    def present(self, positions: tuple[int, ...]) -> list[int]:
        """The layers the listed parameters belong to, in forward order."""
        return sorted({self.layer_of_param[p] for p in positions})


@dataclass
class _Monitor:
    """Running state of one optimizer: device accumulators between logging steps, host records after them."""

    prefix: str
    layers: _Layers | None = None
    device_state: dict[str, Tensor] = field(default_factory=dict)
    norm_history_position: int = 0
    pending_update: tuple[int, tuple[int, ...], list[Tensor], Tensor] | None = None
    # Host-side records (checkpointed).
    history: list[dict[str, Any]] = field(default_factory=list)
    vanishing_since: dict[str, int] = field(default_factory=dict)
    first_vanished: dict[str, int] = field(default_factory=dict)
    explosions: list[dict[str, Any]] = field(default_factory=list)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    amp_skipped: int = 0
    worst_depth_ratio: tuple[float, int] | None = None
    steps: int = 0
    fit_steps: int = 0
    norm_history: list[float] = field(default_factory=list)


class GradientHealthCallback(Callback):
    r"""Record vanishing and exploding gradients per layer, show them in TensorBoard and explain them at the end.

    A *layer* is a module that directly owns parameters, named by its qualified module name (e.g.
    ``network.stages.0.1.conv2``), in the order the forward pass first uses it. Gradients are read in
    ``on_before_optimizer_step``: after the GradScaler has unscaled them under AMP, before gradient clipping, once per
    optimizer step (so with gradient accumulation, on the step that steps), for automatic and manual optimization and
    any number of optimizers. Under DDP the gradients are already all-reduced, so no collective is added and only
    rank zero logs.

    **Every step** (the cheap check): one fused ``torch._foreach_norm`` over the gradients and a handful of device
    ops that count non-finite gradient tensors, GradScaler-skipped steps and exploding steps on the device; with the
    default ``on_nonfinite="warn"`` nothing is copied to the host. **Every** ``log_every_n_steps`` **steps**: per-layer
    norms and ratios, classification, logging; all values reach the host in one transfer.

    Classification (defaults and why):

    - a layer is *vanishing* when its gradient L2 norm is below ``vanishing_threshold`` (1e-8: an update of
      ``lr * 1e-8`` is below fp32's resolution of weights of norm ~1, so the layer is frozen) or below
      ``vanishing_ratio`` (1e-5) times the largest layer norm of the step (that layer learns 100,000x slower than
      the fastest one; healthy ResNets and BatchNorm nets stay within ~1e-3, a plain deep sigmoid net falls to
      1e-10 and below);
    - a step is *exploding* when the total norm exceeds ``exploding_threshold`` (1e3: cross-entropy gradients of
      a healthy classifier are O(0.1-10)) or exceeds ``exploding_factor`` (10x) times the running median of the
      last ``median_window`` (64) finite step norms.

    Args:
        log_every_n_steps: Optimizer steps between detailed records; defaults to the Trainer's
            ``log_every_n_steps``.
        vanishing_threshold: Absolute gradient-norm floor of a layer.
        vanishing_ratio: Relative floor: fraction of the largest layer norm of the same step.
        exploding_threshold: Absolute ceiling of the total gradient norm.
        exploding_factor: Ceiling relative to the running median of the total norm.
        median_window: Number of recent steps in the running median.
        on_nonfinite: What to do with NaN/Inf gradients (outside of fp16 AMP, where the GradScaler already skips
            such steps and they are counted as ``amp_skipped``, never as explosions). ``"warn"``: count them and warn
            at the next logging step. ``"skip"``: drop all gradients of that step, so the optimizer changes no weight
            and no optimizer state (the LR schedule still advances). ``"raise"``: stop with an error naming the step
            and the layers. ``"skip"`` and ``"raise"`` must decide before the step, which costs one host sync per
            step.
        track_update_ratio: On logging steps, snapshot the weights and measure the real relative update
            ``||w_after - w_before|| / ||w_before||`` across the optimizer step.
        track_activations: On logging steps only, hook activation modules: fraction of dead channels after
            ReLU-like activations (no positive output anywhere in the batch) and of saturated outputs of sigmoid/tanh.
        saturation_threshold: An output of sigmoid counts as saturated above this value or below one minus it;
            of tanh, beyond this absolute value.
        histogram_every_n_steps: With a TensorBoardLogger, write per-layer gradient histograms (computed on the
            device, written raw) this often; defaults to 10x the logging interval, 0 disables.
        figure_every_n_steps: With a TensorBoardLogger, draw the gradient-flow figure (layer norm vs depth, log
            scale, vanishing/exploding bands) this often; defaults to 20x the logging interval, 0 disables.
        verbose: Print the diagnosis (rank zero) when ``fit`` ends.

    Raises:
        ValueError: If a threshold is negative, NaN or the vanishing and exploding thresholds are inverted, or an
            interval is negative.

    Example::

        from lightning.pytorch import Trainer
        from stabilize.callbacks import GradientHealthCallback

        health = GradientHealthCallback(on_nonfinite="skip", track_activations=True)
        trainer = Trainer(callbacks=[health], log_every_n_steps=50)
        trainer.fit(model, datamodule)
        print(health.diagnosis())        # also printed at the end of fit
        health.save_json("gradient_health.json")

    Logged metrics (with several optimizers every key gets an ``optimizer_<i>/`` segment after its family, e.g.
    ``grad_health/optimizer_1/global_norm``):

    ======================================  ============================================================
    key                                     value (at each logging step)
    ======================================  ============================================================
    ``grad_health/global_norm``             L2 norm of all gradients of the optimizer
    ``grad_health/min_layer_norm``          smallest layer gradient norm
    ``grad_health/max_layer_norm``          largest layer gradient norm
    ``grad_health/depth_ratio``             first layer's gradient norm / last layer's (forward order)
    ``grad_health/vanishing_layers``        number of layers classified as vanishing
    ``grad_health/exploding``               exploding steps since the previous logging step (inclusive)
    ``grad_health/nonfinite``               non-finite gradient tensors since the previous logging step
    ``grad_health/amp_skipped``             steps the GradScaler skipped since the previous logging step
    ``grad_norm/<layer>``                   gradient L2 norm of the layer
    ``grad_to_weight/<layer>``              gradient norm / weight norm
    ``update_to_weight/<layer>``            ``||w_after - w_before|| / ||w_before||`` (``track_update_ratio``)
    ``activation_dead/<module>``            dead-channel fraction after a ReLU-like module (``track_activations``)
    ``activation_saturated/<module>``       saturated-output fraction of sigmoid/tanh (``track_activations``)
    ======================================  ============================================================

    TensorBoard also receives ``grad_hist/<layer>`` histograms and the ``grad_health/flow`` figure.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        vanishing_threshold: float = 1e-8,
        vanishing_ratio: float = 1e-5,
        exploding_threshold: float = 1e3,
        exploding_factor: float = 10.0,
        median_window: int = 64,
        on_nonfinite: NonFinitePolicy = "warn",
        track_update_ratio: bool = True,
        track_activations: bool = False,
        saturation_threshold: float = 0.99,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_finite(
            vanishing_threshold=vanishing_threshold,
            exploding_threshold=exploding_threshold,
            exploding_factor=exploding_factor,
        )
        if not (0 < vanishing_ratio < 1):
            raise ValueError(f"vanishing_ratio must be in (0, 1), got {vanishing_ratio}.")
        if vanishing_threshold >= exploding_threshold:
            raise ValueError(
                f"vanishing_threshold ({vanishing_threshold}) must be below exploding_threshold"
                f" ({exploding_threshold})."
            )
        if exploding_factor <= 1:
            raise ValueError(f"exploding_factor must be above 1 (a jump over the median), got {exploding_factor}.")
        if median_window < 3:
            raise ValueError(f"median_window must be at least 3, got {median_window}.")
        if on_nonfinite not in ("warn", "skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn', 'skip' or 'raise', got {on_nonfinite!r}.")
        if not (0.5 < saturation_threshold < 1):
            raise ValueError(f"saturation_threshold must be in (0.5, 1), got {saturation_threshold}.")
        for name, value in (
            ("log_every_n_steps", log_every_n_steps),
            ("histogram_every_n_steps", histogram_every_n_steps),
            ("figure_every_n_steps", figure_every_n_steps),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if log_every_n_steps == 0:
            raise ValueError("log_every_n_steps must be positive.")
        self.log_every_n_steps = log_every_n_steps
        self.vanishing_threshold = vanishing_threshold
        self.vanishing_ratio = vanishing_ratio
        self.exploding_threshold = exploding_threshold
        self.exploding_factor = exploding_factor
        self.median_window = median_window
        self.on_nonfinite = on_nonfinite
        self.track_update_ratio = track_update_ratio
        self.track_activations = track_activations
        self.saturation_threshold = saturation_threshold
        self.histogram_every_n_steps = histogram_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self.verbose = verbose
        self._monitors: dict[int, _Monitor] = {}
        self._forward_order: dict[str, int] = {}
        self._order_hooks: list[RemovableHandle] = []
        self._activation_hooks: list[RemovableHandle] = []
        self._activation_stats: dict[str, tuple[str, Tensor]] = {}
        self._step_hooks: dict[int, RemovableHandle] = {}
        self._every = 1
        self._trainer_ref: Trainer | None = None

    # ------------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"GradientHealthCallback does not support {strategy}: each rank holds only a shard of every"
                " gradient, so per-layer norms would be wrong. Use DDP (strategy='ddp') or remove the callback."
            )
        self._every = self.log_every_n_steps or max(trainer.log_every_n_steps, 1)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for monitor in self._monitors.values():
            # A new fit brings new optimizers (and maybe new parameters): rebuild the layer index and step hooks,
            # keeping the records and the recent norms for the running median.
            monitor.norm_history = self._recent_norms(monitor)
            monitor.device_state.clear()
            monitor.layers = None
            monitor.pending_update = None
            monitor.fit_steps = 0
        if not self._forward_order and not _is_compiled(pl_module):
            # Learn the forward order from the first training forward pass, then remove the hooks. Compiled
            # networks keep registration order (hooks added and removed would force a recompile).
            for name, module in _parameter_owners(pl_module):
                self._order_hooks.append(module.register_forward_pre_hook(self._order_hook(name)))

    def _order_hook(self, name: str) -> Any:
        def record(module: nn.Module, args: Any) -> None:
            self._forward_order.setdefault(name, len(self._forward_order))

        return record

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        first = self._monitors.get(0)
        upcoming = self._step_index(trainer, first) if first is not None else trainer.global_step
        if self.track_activations and self._is_logging_step(upcoming) and not self._activation_hooks:
            for name, module in pl_module.named_modules():
                if isinstance(module, _RELU_LIKE + _SATURATING):
                    self._activation_hooks.append(module.register_forward_hook(self._activation_hook(name)))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _remove(self._order_hooks)
        _remove(self._activation_hooks)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _remove(self._order_hooks)
        _remove(self._activation_hooks)
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks.clear()

    def _activation_hook(self, name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Tensor) -> None:
            if not isinstance(output, Tensor) or not module.training:
                return
            with torch.no_grad():
                out = output.detach()
                if isinstance(module, _RELU_LIKE):
                    channels = out.transpose(0, 1).reshape(out.shape[1], -1) if out.ndim > 1 else out.view(1, -1)
                    self._activation_stats[name] = ("dead", (channels.amax(1) <= 0).float().mean())
                else:
                    limit = self.saturation_threshold
                    low = -limit if isinstance(module, (nn.Tanh, nn.Hardtanh)) else 1 - limit
                    saturated = ((out > limit) | (out < low)).float().mean()
                    self._activation_stats[name] = ("saturated", saturated)

        return record

    # ----------------------------------------------------------------------------------------------- every step
    def _is_logging_step(self, optimizer_step: int) -> bool:
        """Whether an optimizer's ``optimizer_step``-th step (0-based) gets a detailed record."""
        return optimizer_step % self._every == 0

    @staticmethod
    def _step_index(trainer: Trainer, monitor: _Monitor) -> int:
        """The upcoming step's index on the logging cadence: Lightning's own ``global_step`` with one optimizer
        (right across resumes and new fits); with several, which all advance ``global_step``, each optimizer's own
        count in the current fit."""
        return trainer.global_step if len(trainer.optimizers) <= 1 else monitor.fit_steps

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = _optimizer_index(trainer, optimizer)
        monitor = self._monitor(trainer, index)
        if monitor.layers is None:
            monitor.layers = self._build_layers(pl_module, optimizer)
            self._register_step_hook(optimizer, index)
        layers = monitor.layers
        monitor.pending_update = None  # a snapshot whose step the GradScaler skipped is stale
        positions = tuple(i for i, p in enumerate(layers.params) if p.grad is not None)
        if not positions:
            return
        grads = [layers.params[i].grad for i in positions]
        device = grads[0].device
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))  # type: ignore[call-arg]
        scaler = _grad_scaler(trainer)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused optimizers unscale inside .step(), after this hook: their gradients are still scaled here.
            norms = norms / scaler._scale.to(device)  # type: ignore[union-attr]
        step = trainer.global_step
        tensor_nonfinite = ~torch.isfinite(norms)
        step_nonfinite = tensor_nonfinite.any()
        total = norms.square().sum().sqrt()
        state = self._device_state(monitor, len(layers.names), device)
        if scaler is not None:
            state["amp_skipped"] += step_nonfinite
        else:
            state["nonfinite_tensors"] += tensor_nonfinite.sum()
            state["nonfinite_first"] = torch.where(
                step_nonfinite & (state["nonfinite_first"] < 0), step, state["nonfinite_first"]
            )
            state["nonfinite_last"] = torch.where(step_nonfinite, step, state["nonfinite_last"])
            layer_index = layers.layer_index(positions, device)
            state["layer_nonfinite"].index_add_(0, layer_index, tensor_nonfinite.float())
        finite = ~step_nonfinite
        history = state["norm_history"]
        median = torch.nanmedian(history)
        exploding = finite & ((total > self.exploding_threshold) | (total > self.exploding_factor * median))
        state["exploding"] += exploding
        state["exploding_first"] = torch.where(
            exploding & (state["exploding_first"] < 0), step, state["exploding_first"]
        )
        state["exploding_last"] = torch.where(exploding, step, state["exploding_last"])
        state["exploding_max"] = torch.where(
            exploding, torch.maximum(state["exploding_max"], total), state["exploding_max"]
        )
        history[monitor.norm_history_position % self.median_window] = torch.where(finite, total, torch.nan)
        monitor.norm_history_position += 1
        logging_step = self._is_logging_step(self._step_index(trainer, monitor))
        monitor.steps += 1
        monitor.fit_steps += 1

        if self.on_nonfinite != "warn" and scaler is None and bool(step_nonfinite):  # the one sync of these policies
            self._handle_nonfinite_now(trainer, monitor, positions, tensor_nonfinite, step)
            return
        if logging_step:
            self._record(trainer, monitor, positions, norms, total, median, step)

    def _handle_nonfinite_now(
        self, trainer: Trainer, monitor: _Monitor, positions: tuple[int, ...], tensor_nonfinite: Tensor, step: int
    ) -> None:
        layers = monitor.layers
        assert layers is not None
        bad = sorted(
            {
                layers.names[layers.layer_of_param[positions[i]]]
                for i in torch.nonzero(tensor_nonfinite).flatten().tolist()
            }
        )
        listed = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite (NaN/Inf) gradients at optimizer step {step} in {len(bad)} layer(s): {listed}."
                " Lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)) or check the loss for"
                " log(0) / division by zero."
            )
        for param in layers.params:
            param.grad = None  # the optimizer skips parameters without a gradient: no weight or state changes
        monitor.skipped_steps.append(step)
        if trainer.is_global_zero:
            rank_zero_warn(f"GradientHealthCallback skipped optimizer step {step}: non-finite gradients in {listed}.")

    # --------------------------------------------------------------------------------------------- logging steps
    def _record(
        self,
        trainer: Trainer,
        monitor: _Monitor,
        positions: tuple[int, ...],
        norms: Tensor,
        total: Tensor,
        median: Tensor,
        step: int,
    ) -> None:
        layers = monitor.layers
        assert layers is not None
        device = norms.device
        num_layers = len(layers.names)
        params = [layers.params[i] for i in positions]
        weight_norms = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))  # type: ignore[call-arg]
        layer_grad = layers.per_layer_norms(positions, norms)
        layer_weight = layers.per_layer_norms(positions, weight_norms)
        if self.track_update_ratio:
            monitor.pending_update = (step, positions, [p.detach().clone() for p in params], layer_weight)
        state = monitor.device_state
        activation_names = sorted(self._activation_stats)
        activation_values = [self._activation_stats[name][1].float().to(device) for name in activation_names]
        packed = torch.cat(
            [
                layer_grad,
                layer_weight,
                torch.stack([total, median]),
                self._counters(state),
                *[v.view(1) for v in activation_values],
            ]
        ).tolist()  # the one host transfer of a logging step
        grad_values = packed[:num_layers]
        weight_values = packed[num_layers : 2 * num_layers]
        total_value, median_value = packed[2 * num_layers : 2 * num_layers + 2]
        counters_end = 2 * num_layers + 2 + len(_COUNTERS) + num_layers
        counts = self._apply_counters(trainer, monitor, packed[2 * num_layers + 2 : counters_end])
        activation_results = dict(zip(activation_names, packed[counters_end:]))

        present = layers.present(positions)
        finite_norms = [grad_values[i] for i in present if math.isfinite(grad_values[i])]
        largest = max(finite_norms, default=0.0)
        vanishing = [
            layers.names[i]
            for i in present
            if math.isfinite(grad_values[i])
            and (grad_values[i] < self.vanishing_threshold or grad_values[i] < self.vanishing_ratio * largest)
        ]
        first_norm, last_norm = grad_values[present[0]], grad_values[present[-1]]
        depth_ratio = first_norm / last_norm if last_norm > 0 else math.inf
        self._update_vanishing(monitor, vanishing, step)
        if math.isfinite(depth_ratio) and (
            monitor.worst_depth_ratio is None or depth_ratio < monitor.worst_depth_ratio[0]
        ):
            monitor.worst_depth_ratio = (depth_ratio, step)
        exploding, nonfinite_tensors, amp_skipped = counts
        record = {
            "step": step,
            "global_norm": total_value,
            "median_norm": median_value,
            "depth_ratio": depth_ratio,
            "min_layer_norm": min(finite_norms, default=math.nan),
            "max_layer_norm": largest,
            "vanishing_layers": vanishing,
            "exploding_steps": int(exploding),
            "nonfinite_tensors": int(nonfinite_tensors),
            "amp_skipped": int(amp_skipped),
            "layers": {
                layers.names[i]: {"grad_norm": grad_values[i], "weight_norm": weight_values[i]} for i in present
            },
        }
        monitor.history.append(record)
        if trainer.is_global_zero:
            metrics = self._metrics(monitor, record, activation_results, layers, present, grad_values, weight_values)
            _log(trainer, metrics, step)
            self._log_tensorboard(trainer, monitor, positions, present, grad_values, step)
        self._activation_stats.clear()

    @staticmethod
    def _counters(state: dict[str, Tensor]) -> Tensor:
        """The device accumulators as one float vector: the scalars of ``_COUNTERS``, then per-layer flags."""
        return torch.cat([torch.stack([state[name].float() for name in _COUNTERS]), state["layer_nonfinite"]])

    def _apply_counters(self, trainer: Trainer, monitor: _Monitor, values: list[float]) -> tuple[int, int, int]:
        """Turn the accumulators read from the device into events, warn, reset them on the device.

        Returns the numbers of exploding steps, non-finite gradient tensors and AMP-skipped steps they held.
        """
        counters = dict(zip(_COUNTERS, values))
        layers = monitor.layers
        assert layers is not None
        nonfinite_layers = [layers.names[i] for i, v in enumerate(values[len(_COUNTERS) :]) if v > 0]
        exploding, nonfinite = int(counters["exploding"]), int(counters["nonfinite_tensors"])
        if exploding:
            monitor.explosions.append(
                {
                    "first_step": int(counters["exploding_first"]),
                    "last_step": int(counters["exploding_last"]),
                    "steps": exploding,
                    "max_norm": counters["exploding_max"],
                }
            )
        if nonfinite:
            first, last = int(counters["nonfinite_first"]), int(counters["nonfinite_last"])
            monitor.nonfinite.append(
                {"first_step": first, "last_step": last, "tensors": nonfinite, "layers": nonfinite_layers}
            )
            if trainer.is_global_zero:
                rank_zero_warn(
                    f"GradientHealthCallback: {nonfinite} non-finite gradient tensor(s) between optimizer steps"
                    f" {first} and {last}, in {', '.join(nonfinite_layers[:10])}. Use on_nonfinite='skip' to drop"
                    " such steps or 'raise' to stop at the first one."
                )
        amp_skipped = int(counters["amp_skipped"])
        monitor.amp_skipped += amp_skipped
        self._reset_counters(monitor.device_state)
        return exploding, nonfinite, amp_skipped

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Events counted on the device after the last logging step would otherwise never be reported.
        for monitor in self._monitors.values():
            if monitor.device_state and monitor.layers is not None:
                self._apply_counters(trainer, monitor, self._counters(monitor.device_state).tolist())

    def _metrics(
        self,
        monitor: _Monitor,
        record: dict[str, Any],
        activations: dict[str, float],
        layers: _Layers,
        present: list[int],
        grad_values: list[float],
        weight_values: list[float],
    ) -> dict[str, float]:
        key = self._key_maker(monitor)
        metrics = {
            key("grad_health", name): float(record[name])
            for name in ("global_norm", "min_layer_norm", "max_layer_norm", "depth_ratio")
        }
        metrics[key("grad_health", "vanishing_layers")] = float(len(record["vanishing_layers"]))
        metrics[key("grad_health", "exploding")] = float(record["exploding_steps"])
        metrics[key("grad_health", "nonfinite")] = float(record["nonfinite_tensors"])
        metrics[key("grad_health", "amp_skipped")] = float(record["amp_skipped"])
        for i in present:
            name = layers.names[i]
            metrics[key("grad_norm", name)] = grad_values[i]
            if weight_values[i] > 0:
                metrics[key("grad_to_weight", name)] = grad_values[i] / weight_values[i]
        for name, value in activations.items():
            kind = self._activation_stats[name][0]
            metrics[key(f"activation_{kind}", name)] = value
        return metrics

    @staticmethod
    def _key_maker(monitor: _Monitor) -> Any:
        return lambda family, name: f"{family}/{monitor.prefix}{name}"

    def _on_optimizer_stepped(self, index: int) -> None:
        """Optimizer step post-hook: turn the logging step's weight snapshot into real update ratios."""
        monitor = self._monitors.get(index)
        if monitor is None or monitor.pending_update is None or monitor.layers is None:
            return
        step, positions, before, layer_weight = monitor.pending_update
        monitor.pending_update = None
        layers = monitor.layers
        with torch.no_grad():
            deltas = torch._foreach_sub([layers.params[i].detach() for i in positions], before)
            delta_norms = torch.stack(torch._foreach_norm(deltas, 2, dtype=torch.float32))  # type: ignore[call-arg]
        ratios = (layers.per_layer_norms(positions, delta_norms) / layer_weight).tolist()
        updates = {layers.names[i]: ratios[i] for i in layers.present(positions) if math.isfinite(ratios[i])}
        if monitor.history and monitor.history[-1]["step"] == step:
            for name, ratio in updates.items():
                monitor.history[-1]["layers"][name]["update_to_weight"] = ratio
        if self._trainer_ref is not None and self._trainer_ref.is_global_zero:
            key = self._key_maker(monitor)
            _log(self._trainer_ref, {key("update_to_weight", name): r for name, r in updates.items()}, step)

    # ------------------------------------------------------------------------------------------------ TensorBoard
    def _log_tensorboard(
        self,
        trainer: Trainer,
        monitor: _Monitor,
        positions: tuple[int, ...],
        present: list[int],
        grad_values: list[float],
        step: int,
    ) -> None:
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not writers:
            return
        histogram_every = self._interval(self.histogram_every_n_steps, 10)
        figure_every = self._interval(self.figure_every_n_steps, 20)
        if histogram_every and step % histogram_every == 0:
            self._write_histograms(writers, monitor, positions, step)
        if figure_every and step % figure_every == 0:
            names = [monitor.layers.names[i] for i in present]  # type: ignore[union-attr]
            figure = self.flow_figure(names, [grad_values[i] for i in present])
            for writer in writers:
                writer.add_figure(f"grad_health/{monitor.prefix}flow", figure, global_step=step, close=False)
            import matplotlib.pyplot as plt

            plt.close(figure)

    def _interval(self, value: int | None, multiple: int) -> int:
        return self._every * multiple if value is None else value

    def _write_histograms(self, writers: list[Any], monitor: _Monitor, positions: tuple[int, ...], step: int) -> None:
        layers = monitor.layers
        assert layers is not None
        by_layer: dict[int, list[Tensor]] = {}
        for position in positions:
            by_layer.setdefault(layers.layer_of_param[position], []).append(layers.params[position].grad)
        rows, names = [], []
        for layer, grads in by_layer.items():
            values = torch.cat([g.detach().flatten().float() for g in grads])
            low, high = values.min(), values.max()
            # Bin on the device; only 64 counts and 5 statistics per layer travel to the host.
            width = (high - low).clamp(min=torch.finfo(torch.float32).tiny)
            bins = ((values - low) / width * _HISTOGRAM_BINS).long().clamp_(0, _HISTOGRAM_BINS - 1)
            counts = torch.bincount(bins, minlength=_HISTOGRAM_BINS).float()
            rows.append(torch.cat([torch.stack([low, high, values.sum(), values.square().sum()]), counts]))
            names.append((layers.names[layer], values.numel()))
        table = torch.stack(rows).cpu().tolist()
        for (name, count), row in zip(names, table):
            low, high, total, squares = row[:4]
            if not all(math.isfinite(v) for v in row[:4]):
                continue
            limits = [low + (high - low) * (k + 1) / _HISTOGRAM_BINS for k in range(_HISTOGRAM_BINS)]
            for writer in writers:
                writer.add_histogram_raw(
                    f"grad_hist/{monitor.prefix}{name}",
                    min=low,
                    max=high,
                    num=count,
                    sum=total,
                    sum_squares=squares,
                    bucket_limits=limits,
                    bucket_counts=row[4:],
                    global_step=step,
                )

    def flow_figure(self, names: Sequence[str], norms: Sequence[float]) -> Any:
        """Matplotlib figure of the gradient flow: layer gradient norm against depth, log scale, with the
        vanishing band (below the absolute and relative floors) and the exploding band shaded."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        finite = [n if math.isfinite(n) and n > 0 else math.nan for n in norms]
        figure, axis = plt.subplots(figsize=(max(6.0, 0.18 * len(names)), 4.0))
        depth = list(range(len(names)))
        axis.plot(depth, finite, marker="o", markersize=3, linewidth=1.2, color="#1f77b4", label="layer grad norm")
        largest = max((n for n in finite if math.isfinite(n)), default=1.0)
        floor = max(self.vanishing_threshold, self.vanishing_ratio * largest)
        low = min([n for n in finite if math.isfinite(n)] + [floor]) / 10
        axis.axhspan(low, floor, color="#d62728", alpha=0.12, label="vanishing")
        axis.axhspan(
            self.exploding_threshold, self.exploding_threshold * 100, color="#ff7f0e", alpha=0.12, label="exploding"
        )
        axis.set_yscale("log")
        high = max(largest * 10, self.exploding_threshold * 10)
        axis.set_ylim(low, high)
        # A log axis cannot show 0 or NaN/Inf: mark those layers on its edges instead of dropping them.
        for where, label, marker, y in (
            ([i for i, n in enumerate(norms) if n == 0], "exactly zero", "x", low * 1.5),
            ([i for i, n in enumerate(norms) if not math.isfinite(n)], "non-finite", "^", high / 1.5),
        ):
            if where:
                axis.scatter(where, [y] * len(where), marker=marker, color="#d62728", s=24, zorder=3, label=label)
        axis.set_xlabel("layer (forward order)")
        axis.set_ylabel("gradient L2 norm")
        step = max(1, len(names) // 24)
        axis.set_xticks(depth[::step])
        axis.set_xticklabels([names[i] for i in depth[::step]], rotation=70, ha="right", fontsize=6)
        axis.legend(loc="upper left", fontsize=7)
        axis.set_title("Gradient flow")
        figure.tight_layout()
        return figure

    # ----------------------------------------------------------------------------------------------- diagnosis
    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.verbose and trainer.is_global_zero and self._monitors:
            rank_zero_info(self.diagnosis(pl_module))

    def summary(self) -> dict[str, Any]:
        """Everything the diagnosis says, as a dict (one entry per optimizer, keyed ``"optimizer_<i>"``)."""
        return {f"optimizer_{index}": self._summary(monitor) for index, monitor in sorted(self._monitors.items())}

    def _summary(self, monitor: _Monitor) -> dict[str, Any]:
        last = monitor.history[-1] if monitor.history else {}
        return {
            "steps": monitor.steps,
            "logged_steps": len(monitor.history),
            "vanishing_layers_now": {name: monitor.vanishing_since[name] for name in last.get("vanishing_layers", [])},
            "ever_vanished": dict(monitor.first_vanished),
            "explosions": list(monitor.explosions),
            "nonfinite": list(monitor.nonfinite),
            "skipped_steps": list(monitor.skipped_steps),
            "amp_skipped_steps": monitor.amp_skipped,
            "worst_depth_ratio": (
                None
                if monitor.worst_depth_ratio is None
                else {"ratio": monitor.worst_depth_ratio[0], "step": monitor.worst_depth_ratio[1]}
            ),
            "last_global_norm": last.get("global_norm"),
            "num_layers": len(monitor.layers.names) if monitor.layers is not None else len(last.get("layers", {})),
        }

    @property
    def history(self) -> list[dict[str, Any]]:
        """The records of every logging step (of the first optimizer; see :meth:`history_of` for others)."""
        return self.history_of(min(self._monitors, default=0))

    def history_of(self, optimizer_index: int) -> list[dict[str, Any]]:
        monitor = self._monitors.get(optimizer_index)
        return monitor.history if monitor is not None else []

    def save_json(self, path: str | Path) -> None:
        """Write the summary and the history of every optimizer to ``path`` as JSON."""
        payload = {
            "summary": self.summary(),
            "history": {f"optimizer_{i}": m.history for i, m in sorted(self._monitors.items())},
        }
        Path(path).write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False))

    def diagnosis(self, pl_module: nn.Module | None = None) -> str:
        """A readable report: what went wrong, where, since when, and what to do about it."""
        lines = []
        for index, monitor in sorted(self._monitors.items()):
            title = "Gradient health" + (f" (optimizer {index})" if len(self._monitors) > 1 else "")
            lines += [f"{title} after {monitor.steps} optimizer steps (details every {self._every}):"]
            lines += self._diagnosis_lines(monitor, pl_module)
        return "\n".join(lines)

    def _diagnosis_lines(self, monitor: _Monitor, pl_module: nn.Module | None) -> list[str]:
        summary = self._summary(monitor)
        lines, remedies = [], []
        vanishing = summary["vanishing_layers_now"]
        if vanishing:
            layers = list(vanishing)
            lines.append(f"  VANISHING: {len(layers)} of {summary['num_layers']} layers get almost no gradient:")
            width = max(len(name) for name in layers[:12])
            last = monitor.history[-1]["layers"]
            for name in layers[:12]:
                lines.append(
                    f"    {name:<{width}}  grad norm {last[name]['grad_norm']:.2e}"
                    f"  vanishing since step {vanishing[name]}"
                )
            if len(layers) > 12:
                lines.append(f"    ... and {len(layers) - 12} more")
            dead = sum(last[name]["grad_norm"] == 0.0 for name in layers)
            remedies += self._vanishing_remedies(pl_module, dead)
        elif summary["ever_vanished"]:
            names = ", ".join(list(summary["ever_vanished"])[:5])
            lines.append(f"  Vanishing earlier but recovered: {names}.")
        else:
            lines.append("  Vanishing: none.")
        if summary["worst_depth_ratio"] is not None:
            ratio = summary["worst_depth_ratio"]
            lines.append(
                f"  Worst depth ratio (first layer / last layer gradient norm): {ratio['ratio']:.2e}"
                f" at step {ratio['step']}."
            )
        if summary["explosions"]:
            steps = sum(e["steps"] for e in summary["explosions"])
            spans = ", ".join(
                f"{e['first_step']}-{e['last_step']}" if e["first_step"] != e["last_step"] else str(e["first_step"])
                for e in summary["explosions"][:8]
            )
            peak = max(e["max_norm"] for e in summary["explosions"])
            lines.append(f"  EXPLODING: {steps} step(s) with a gradient norm spike (steps {spans}; peak {peak:.3g}).")
            remedies.append(
                "clip gradients (Trainer(gradient_clip_val=1.0)), lower the learning rate or add a"
                " warm-up (--model.warmup_fraction 0.05)"
            )
        else:
            lines.append("  Exploding: none.")
        if summary["nonfinite"] or summary["skipped_steps"]:
            events = summary["nonfinite"]
            layers = sorted({name for e in events for name in e["layers"]})
            where = f" in {', '.join(layers[:6])}" if layers else ""
            first = min([e["first_step"] for e in events] + summary["skipped_steps"])
            lines.append(
                f"  NON-FINITE gradients from step {first}{where}; {len(summary['skipped_steps'])} step(s) skipped."
            )
            remedies.append(
                "non-finite gradients: lower the learning rate, clip gradients, check the loss for log(0)"
                " or division by zero, prefer bf16-mixed over 16-mixed"
            )
        else:
            lines.append("  Non-finite gradients: none.")
        if summary["amp_skipped_steps"]:
            lines.append(
                f"  AMP: the GradScaler skipped {summary['amp_skipped_steps']} step(s) with overflowing fp16"
                " gradients (a few while it calibrates are normal; not counted as explosions)."
            )
        if remedies:
            lines.append("  What to do: " + "; ".join(dict.fromkeys(remedies)) + ".")
        else:
            lines.append("  Healthy: no action needed.")
        return lines

    @staticmethod
    def _vanishing_remedies(pl_module: nn.Module | None, dead_layers: int = 0) -> list[str]:
        """Remedies that fit the model: what it lacks (normalization), what saturates, what died."""
        if pl_module is None:
            return [
                "vanishing gradients: add normalization (BatchNorm) and residual connections, use ReLU with He"
                " (kaiming) initialisation"
            ]
        modules = list(pl_module.modules())
        saturating = any(isinstance(m, _SATURATING) for m in modules)
        relu_like = any(isinstance(m, _RELU_LIKE) for m in modules)
        remedies = []
        if dead_layers and relu_like and not saturating:
            remedies.append(
                f"{dead_layers} layer(s) get exactly zero gradient: the ReLU units died, typically after too large"
                " a step (look for spikes before). Lower the learning rate or add a warm-up; LeakyReLU/GELU and"
                " normalization keep units alive; track_activations=True measures the dead fraction"
            )
        if not any(isinstance(m, _NORMALIZATION) for m in modules):
            remedies.append("add normalization after each conv (e.g. BatchNormCNN instead of DeepPlainCNN)")
        remedies.append("add residual connections (ResNet, or FixupResNet without normalization)")
        if saturating:
            remedies.append("replace sigmoid/tanh by ReLU-like activations, which do not saturate")
            remedies.append("initialise with He (kaiming) or Xavier scaling instead of a small fixed std")
        elif not dead_layers:
            remedies.append("check the initialisation: He (kaiming) scaling for ReLU-like activations")
        return remedies

    # -------------------------------------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        monitors = {}
        for index, monitor in self._monitors.items():
            recent = self._recent_norms(monitor)
            monitors[index] = {
                "prefix": monitor.prefix,
                "history": monitor.history,
                "vanishing_since": monitor.vanishing_since,
                "first_vanished": monitor.first_vanished,
                "explosions": monitor.explosions,
                "nonfinite": monitor.nonfinite,
                "skipped_steps": monitor.skipped_steps,
                "amp_skipped": monitor.amp_skipped,
                "worst_depth_ratio": monitor.worst_depth_ratio,
                "steps": monitor.steps,
                "norm_history": recent,
            }
        return {"monitors": monitors, "forward_order": dict(self._forward_order)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._forward_order = dict(state_dict.get("forward_order", {}))
        self._monitors = {}
        for index, saved in state_dict.get("monitors", {}).items():
            monitor = _Monitor(prefix=saved["prefix"])
            for name in (
                "history",
                "vanishing_since",
                "first_vanished",
                "explosions",
                "nonfinite",
                "skipped_steps",
                "amp_skipped",
                "steps",
                "norm_history",
            ):
                setattr(monitor, name, saved[name])
            monitor.worst_depth_ratio = tuple(saved["worst_depth_ratio"]) if saved["worst_depth_ratio"] else None
            self._monitors[int(index)] = monitor

    # ------------------------------------------------------------------------------------------------- helpers
    def _monitor(self, trainer: Trainer, index: int) -> _Monitor:
        self._trainer_ref = trainer
        if index not in self._monitors:
            prefix = f"optimizer_{index}/" if len(trainer.optimizers) > 1 else ""
            self._monitors[index] = _Monitor(prefix=prefix)
        return self._monitors[index]

    def _build_layers(self, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> _Layers:
        _remove(self._order_hooks)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        owners = [
            (name, module)
            for name, module in _parameter_owners(pl_module)
            if any(id(p) in in_optimizer for p in module.parameters(recurse=False))
        ]
        registration = {name: i for i, (name, _) in enumerate(owners)}
        order = self._forward_order
        # Modules the forward pass used, in that order; unused ones after them, in registration order.
        owners.sort(key=lambda item: (item[0] not in order, order.get(item[0], registration[item[0]])))
        names, params, layer_of_param = [], [], []
        for layer, (name, module) in enumerate(owners):
            names.append(name or "(root)")
            for param in module.parameters(recurse=False):
                if id(param) in in_optimizer and param.requires_grad:
                    params.append(param)
                    layer_of_param.append(layer)
        return _Layers(names, params, layer_of_param)

    def _register_step_hook(self, optimizer: torch.optim.Optimizer, index: int) -> None:
        if self.track_update_ratio and index not in self._step_hooks:
            self._step_hooks[index] = optimizer.register_step_post_hook(
                lambda *args, **kwargs: self._on_optimizer_stepped(index)
            )

    def _device_state(self, monitor: _Monitor, num_layers: int, device: torch.device) -> dict[str, Tensor]:
        state = monitor.device_state
        if not state or state["exploding"].device != device:
            history = torch.full((self.median_window,), math.nan, device=device)
            recent = monitor.norm_history[-self.median_window :]
            if recent:
                history[: len(recent)] = torch.tensor(recent, device=device)
            monitor.norm_history_position = len(recent)
            state.update(norm_history=history, layer_nonfinite=torch.zeros(num_layers, device=device))
            state.update(
                {
                    name: torch.zeros((), dtype=torch.long, device=device)
                    for name in ("exploding", "nonfinite_tensors", "amp_skipped")
                }
            )
            state.update(
                {
                    name: torch.full((), -1, dtype=torch.long, device=device)
                    for name in ("exploding_first", "exploding_last", "nonfinite_first", "nonfinite_last")
                }
            )
            state["exploding_max"] = torch.zeros((), device=device)
        return state

    def _recent_norms(self, monitor: _Monitor) -> list[float]:
        """The finite total norms of the running-median window, oldest first (one host read)."""
        history = monitor.device_state.get("norm_history")
        if history is None:
            return list(monitor.norm_history)
        position = monitor.norm_history_position % self.median_window
        ordered = torch.cat([history[position:], history[:position]]).tolist()
        return [value for value in ordered if math.isfinite(value)]

    @staticmethod
    def _reset_counters(state: dict[str, Tensor]) -> None:
        for name in ("exploding", "nonfinite_tensors", "amp_skipped", "exploding_max", "layer_nonfinite"):
            state[name].zero_()
        for name in ("exploding_first", "exploding_last", "nonfinite_first", "nonfinite_last"):
            state[name].fill_(-1)

    @staticmethod
    def _update_vanishing(monitor: _Monitor, vanishing: list[str], step: int) -> None:
        for name in vanishing:
            monitor.vanishing_since.setdefault(name, step)
            monitor.first_vanished.setdefault(name, step)
        for name in list(monitor.vanishing_since):
            if name not in vanishing:
                del monitor.vanishing_since[name]


def _parameter_owners(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if any(True for _ in child.parameters(recurse=False)):
            yield name, child


def _optimizer_index(trainer: Trainer, optimizer: torch.optim.Optimizer) -> int:
    for index, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return index
    return 0


def _grad_scaler(trainer: Trainer) -> Any:
    plugin = trainer.precision_plugin
    return plugin.scaler if isinstance(plugin, MixedPrecision) else None


def _is_compiled(pl_module: nn.Module) -> bool:
    compiled = getattr(pl_module, "_compiled_network", None) is not None
    return compiled or any(type(m).__name__ == "OptimizedModule" for m in pl_module.modules())


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _check_positive_finite(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value}.")


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become null (JSON has no NaN/Inf), tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


__all__ = ["GradientHealthCallback"]
