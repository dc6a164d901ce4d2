"""GradientHealthCallback: per-layer vanishing/exploding gradient statistics, diagnosed in plain words."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from stabilize.callbacks.gradient_health_output import HealthOutput
from stabilize.callbacks.nonfinite_policy import NonFiniteGuard, NonFinitePolicy
from stabilize.callbacks.optimizers import grad_scaler, optimizer_index, optimizer_name, pending_grad_scaler
from stabilize.callbacks.unhealthy_policy import UnhealthyAlarm, UnhealthyPolicy
from stabilize.errors import ConfigurationError
from stabilize.health import GradientMonitor, HealthCriteria, HealthSummary, LayerIndex, StepRecord, flow_figure
from stabilize.health.activations import ActivationProbe
from stabilize.health.diagnosis import report
from stabilize.health.judgements import judges_loss
from stabilize.health.layers import ForwardOrder
from stabilize.health.pending import Observation
from stabilize.health.records import jsonable, record_metrics
from stabilize.health.temporal import TemporalProbe


class GradientHealthCallback(Callback):
    r"""Record vanishing and exploding gradients per layer, show them in TensorBoard and explain them at the end.

    A *layer* is a module that directly owns parameters, named by its qualified module name (e.g.
    ``network.stages.0.1.conv2``), in the order the forward pass first uses it. Gradients are read in
    ``on_before_optimizer_step``: after the GradScaler has unscaled them under AMP, before gradient clipping, once per
    optimizer step (so with gradient accumulation, on the step that steps), for automatic and manual optimization and
    any number of optimizers (a closure optimizer such as LBFGS: the gradient of its first closure call, at the
    step's starting point). Under DDP the gradients are already all-reduced, so no collective is added and only
    rank zero logs. Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard``) each process holds a shard of every
    gradient: the squared norms of the shards are all-reduced as one small tensor per step (as FSDP's own
    ``clip_grad_norm_`` does), so every number is the whole model's; histograms are not written. Lightning's
    ``FSDPStrategy`` (FSDP1) and DeepSpeed are refused at setup. Works on any LightningModule: float64, complex and
    sparse gradients, tied weights (counted once), lazy and compiled modules; the maths lives in
    `stabilize.health`.

    **Every step** (the cheap check): one fused ``torch._foreach_norm`` over the gradients and a handful of device
    ops that count non-finite gradient tensors, GradScaler-skipped steps and exploding steps on the device; with the
    default ``on_nonfinite="warn"`` nothing is copied to the host. **Every** ``log_every_n_steps`` **steps**: per-layer
    norms and ratios, classification, logging; all values reach the host in one transfer.

    A layer is *vanishing* when its gradient norm falls below ``vanishing_threshold`` or below ``vanishing_ratio``
    times the step's largest layer norm. A step is a *spike* when the total norm exceeds ``exploding_factor`` times
    the running median, once ``warmup_steps`` norms are known; spikes are an *explosion* only with evidence that the
    gradient is out of control: ``spike_persistence`` consecutive spikes, a training loss that never gets back below
    its level before the spike, non-finite gradients after it, or a norm out of range (above
    ``gradient_to_loss_ceiling`` times the loss, or an ``exploding_threshold`` you set) five steps in a row.
    Other spikes are reported as transient, with their steps. The training loss, read on the device from
    ``on_before_backward`` at every step, is judged too: a loss that blows up (its smoothed value above twice its
    best, or giving back half its progress) and does not recover makes the verdict ``unstable``, which an adaptive
    optimizer at too high a learning rate produces while its gradient norm stays unremarkable
    (`stabilize.health.instability`). Every step's loss and total norm reach the host with the next logging
    step's one transfer, so the verdict is the same at any ``log_every_n_steps``, and the fit's last step always
    gets a record. The verdict does not depend on the loss's scale (the defaults and why:
    `stabilize.health.HealthCriteria` and `stabilize.health.explosions`).

    When a finding is confirmed while training runs (a loss blow-up, an explosion by a rule that needs no future:
    `stabilize.health.alerts`), the callback says so at the next logging step, once per kind: one log line,
    and with a TensorBoardLogger the text ``grad_health/alerts`` and a scalar; ``on_unhealthy="stop"`` also saves a
    checkpoint and stops the run, so a doomed run costs minutes.

    The remedies in the diagnosis are generic (normalization, residual connections, activations, initialisation,
    clipping, warm-up); a model adds its own by defining ``gradient_health_hints()`` (see
    `stabilize.health.diagnosis`).

    Args:
        log_every_n_steps: Optimizer steps between detailed records; defaults to the Trainer's
            ``log_every_n_steps``.
        vanishing_threshold: Absolute gradient-norm floor of a layer.
        vanishing_ratio: Relative floor: fraction of the largest layer norm of the same step.
        exploding_threshold: Absolute ceiling of the total gradient norm; a step above it is exploding whatever
            follows. ``None`` (the default): no absolute ceiling, since no number is large for every model (a loss
            multiplied by 1e3 multiplies every gradient by 1e3).
        exploding_factor: A step is a spike above this many times the running median of the total norm.
        median_window: Number of recent steps in the running median (3 to 100,000).
        warmup_steps: Steps in the running median before spikes are judged (at most ``median_window``).
        spike_persistence: This many consecutive spikes are an explosion (32: half the default window; healthy
            runs knocked off course by a hard batch have runs of up to ~20).
        gradient_to_loss_ceiling: A step whose total norm exceeds this many times its training loss's magnitude
            (``||grad log L||``, free of the loss's scale) is out of range; 5 such steps in a row are an explosion.
            Healthy runs stay below ~40; ``None`` disables it.
        collapse_factor: The diagnosis reports a collapsed gradient when the run's total norm (median of its latest
            records) is this many times below its earlier level (runs without explosions).
        on_nonfinite: What to do with NaN/Inf gradients (outside of fp16 AMP, where the GradScaler already skips
            such steps and they are counted as ``amp_skipped``, never as explosions). ``"warn"``: count them and warn
            at the next logging step. ``"skip"``: drop all gradients of that step, so the optimizer changes no weight
            and no optimizer state, and restore the buffers (BatchNorm statistics) the step's forward passes changed
            (the LR schedule still advances; anything non-finite left is reported as an error). ``"raise"``: stop
            with an error naming the step and the layers, after printing the diagnosis so far. ``"skip"`` and
            ``"raise"`` must decide before the step, which costs one host sync per step.
        on_unhealthy: What to do when a finding is confirmed during training: ``"warn"`` (one log line and the
            TensorBoard text and scalar), ``"stop"`` (also save ``unhealthy-step=<step>.ckpt`` in the ModelCheckpoint's
            folder, else ``default_root_dir``, and stop after the batch), ``"ignore"`` (the alerts stay in
            ``summary()`` only).
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
        histogram_min_interval_s: Least wall time between two histogram writes (10 s: a histogram step costs a few
            logging steps, so at ``log_every_n_steps=1`` they would otherwise cost several percent).
        figure_min_interval_s: Least wall time between two flow figures (60 s: drawing one costs ~0.1-0.2 s of
            matplotlib). 0 lets the step intervals alone decide.
        verbose: Print the diagnosis (rank zero) when ``fit`` ends.

    Raises:
        ConfigurationError: (a ValueError) If a threshold is negative, NaN or the thresholds are inverted, an
            interval is negative or not an integer, or ``on_nonfinite`` or ``on_unhealthy`` is unknown.

    Example:
        ```python
        from lightning.pytorch import Trainer
        from stabilize.callbacks import GradientHealthCallback

        health = GradientHealthCallback(on_nonfinite="skip", track_activations=True)
        trainer = Trainer(callbacks=[health], log_every_n_steps=50)
        trainer.fit(model, datamodule)
        print(health.diagnosis())        # also printed at the end of fit
        health.save_json("gradient_health.json")
        ```

    Logged metrics (with several optimizers every key gets a segment naming the optimizer after its family: the
    submodule that holds all its parameters, e.g. ``grad_health/discriminator/global_norm`` for a GAN, else
    ``optimizer_<i>``, e.g. ``grad_health/optimizer_1/global_norm``; the diagnosis has one section per optimizer):

    | key | value (at each logging step) |
    |---|---|
    | ``grad_health/global_norm`` | L2 norm of all gradients of the optimizer |
    | ``grad_health/global_norm_max`` | largest global norm since the previous logging step (inclusive) |
    | ``grad_health/min_layer_norm`` | smallest layer gradient norm |
    | ``grad_health/max_layer_norm`` | largest layer gradient norm |
    | ``grad_health/depth_ratio`` | first layer's gradient norm / last layer's (forward order) |
    | ``grad_health/vanishing_layers`` | number of layers classified as vanishing |
    | ``grad_health/spikes`` | steps above ``exploding_factor`` x the running median since the last logging step |
    | ``grad_health/exploding`` | those of the spikes in a persistent run or above ``exploding_threshold`` |
    | ``grad_health/nonfinite`` | non-finite gradient tensors since the previous logging step |
    | ``grad_health/amp_skipped`` | steps the GradScaler skipped since the previous logging step |
    | ``grad_health/alert_<kind>`` | 1 at the step an alert of this kind (``unstable``, ``exploding``) was raised |
    | ``grad_norm/<layer>`` | gradient L2 norm of the layer |
    | ``grad_to_weight/<layer>`` | gradient norm / weight norm |
    | ``update_to_weight/<layer>`` | ‖w_after - w_before‖ / ‖w_before‖ (``track_update_ratio``) |
    | ``activation_dead/<module>`` | dead-channel fraction after a ReLU-like module (``track_activations``) |
    | ``activation_saturated/<module>`` | saturated-output fraction of sigmoid/tanh (``track_activations``) |

    TensorBoard also receives ``grad_hist/<layer>`` histograms, ``grad_log10/<layer>`` histograms of ``log10 |g|``
    (non-zero values: readable axes for tiny gradients), the ``grad_health/flow`` figure and the
    ``grad_health/alerts`` text.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        vanishing_threshold: float = 1e-8,
        vanishing_ratio: float = 1e-5,
        exploding_threshold: float | None = None,
        exploding_factor: float = 10.0,
        median_window: int = 64,
        collapse_factor: float = 100.0,
        warmup_steps: int = 16,
        spike_persistence: int = 32,
        gradient_to_loss_ceiling: float | None = 1e3,
        on_nonfinite: NonFinitePolicy = "warn",
        on_unhealthy: UnhealthyPolicy = "warn",
        track_update_ratio: bool = True,
        track_activations: bool = False,
        saturation_threshold: float = 0.99,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        histogram_min_interval_s: float = 10.0,
        figure_min_interval_s: float = 60.0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.criteria = HealthCriteria(
            vanishing_threshold,
            vanishing_ratio,
            exploding_threshold,
            exploding_factor,
            median_window,
            collapse_factor,
            warmup_steps,
            spike_persistence,
            gradient_to_loss_ceiling,
        )
        self._nonfinite = NonFiniteGuard(on_nonfinite)
        self._alarm = UnhealthyAlarm(on_unhealthy)
        if not (isinstance(saturation_threshold, (int, float)) and 0.5 < saturation_threshold < 1):
            raise ConfigurationError(f"saturation_threshold must be in (0.5, 1), got {saturation_threshold!r}.")
        HealthOutput.check_cadence(
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            figure_every_n_steps=figure_every_n_steps,
            histogram_min_interval_s=histogram_min_interval_s,
            figure_min_interval_s=figure_min_interval_s,
        )
        self.log_every_n_steps = log_every_n_steps
        self.vanishing_threshold = vanishing_threshold
        self.vanishing_ratio = vanishing_ratio
        self.exploding_threshold = exploding_threshold
        self.exploding_factor = exploding_factor
        self.median_window = median_window
        self.collapse_factor = collapse_factor
        self.warmup_steps = warmup_steps
        self.spike_persistence = spike_persistence
        self.gradient_to_loss_ceiling = gradient_to_loss_ceiling
        self.on_nonfinite = on_nonfinite
        self.on_unhealthy = on_unhealthy
        self.track_update_ratio = track_update_ratio
        self.track_activations = track_activations
        self.saturation_threshold = saturation_threshold
        self.histogram_every_n_steps = histogram_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self.histogram_min_interval_s = histogram_min_interval_s
        self.figure_min_interval_s = figure_min_interval_s
        self.verbose = verbose
        self._monitors: dict[int, GradientMonitor] = {}
        self._fit_steps: dict[int, int] = {}
        self._forward_order = ForwardOrder()
        self._temporal = TemporalProbe()
        self._activations = ActivationProbe(saturation_threshold)
        self._step_hooks: dict[int, RemovableHandle] = {}
        self._every = 1
        self._output = HealthOutput(0, 0, 0.0, 0.0)
        self._pending_metrics: dict[int, tuple[int, dict[str, float]]] = {}
        self._trainer_ref: Trainer | None = None
        #: The training losses of the backward passes since the last optimizer step, summed on the device.
        self._loss: Tensor | None = None
        #: The global step each optimizer was last observed at: a closure optimizer (LBFGS) calls its closure, and so
        #: ``on_before_optimizer_step``, several times per step; only the first call, at the step's starting point,
        #: is its gradient.
        self._observed_at: dict[int, int] = {}
        #: The last non-finite step warned about per optimizer, so that a run of them is warned about once.
        self._nonfinite_warned: dict[int, int] = {}
        self._stopped_by: str | None = None
        #: Training began in this fit (on_train_start): an exception before it leaves nothing to report.
        self._training = False
        #: The optimizer steps this fit will take (Lightning's estimate; inf when unbounded).
        self._total_steps: float = math.inf
        #: The last step of a single-optimizer fit, which always gets a record: what the run ends with (vanishing
        #: layers now, the temporal ratio) does not depend on the cadence (inf: unknown, or several optimizers).
        self._final_step: float = math.inf

    # ---------------------------------------------------------------------------------------- setup and teardown
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in ("FSDP", "DeepSpeed")):
            raise ConfigurationError(
                f"GradientHealthCallback does not support {strategy}: its flat-parameter shards are not verified"
                " here (Lightning runs them on CUDA only). Use ModelParallelStrategy with"
                " torch.distributed.fsdp.fully_shard (FSDP2), whose per-parameter shards it reads, or DDP."
            )
        # Lightning's logger connector sets Trainer.log_every_n_steps at run time (it is not a typed attribute).
        self._every = self.log_every_n_steps or max(getattr(trainer, "log_every_n_steps", 1), 1)
        self._output = HealthOutput(
            self._every * 10 if self.histogram_every_n_steps is None else self.histogram_every_n_steps,
            self._every * 20 if self.figure_every_n_steps is None else self.figure_every_n_steps,
            self.histogram_min_interval_s,
            self.figure_min_interval_s,
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A new fit brings new optimizers (and maybe new parameters): the layer index is rebuilt at the first step;
        # records, device counters and the recent norms of the running median carry over.
        for monitor in self._monitors.values():
            monitor.detach()
            monitor.stopped_by = None
        self._fit_steps = dict.fromkeys(self._monitors, 0)
        self._observed_at.clear()
        self._stopped_by = None
        self._training = False
        if not self._forward_order.order and not _holds_compiled_module(pl_module):
            # Learn the forward order from the first training forward pass, then remove the hooks. Compiled
            # networks keep registration order (hooks added and removed would force a recompile).
            self._forward_order.watch(pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training = True
        try:
            self._total_steps = float(trainer.estimated_stepping_batches)
        except (TypeError, ValueError, RuntimeError):  # a loader without a length: no known end
            self._total_steps = math.inf
        self._final_step = self._total_steps - 1 if len(trainer.optimizers) <= 1 else math.inf

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._nonfinite.before_batch(pl_module)
        upcoming = self._step_index(trainer, 0)
        if self.track_activations and self._is_logging_step(upcoming) and not self._activations.attached:
            self._activations.attach(pl_module)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # A model that keeps its recurrent states (``recurrent_states``, (N, T, H)) gets the gradient over time too,
        # hooked on logging steps only.
        # The loss stays on the device: the explosion rules read it with the next logging step's transfer.
        detached = loss.detach()
        if detached.numel() == 1:
            self._loss = detached.reshape(()) if self._loss is None else self._loss + detached.reshape(())
        states = getattr(pl_module, "recurrent_states", None)
        if isinstance(states, Tensor) and self._is_logging_step(self._step_index(trainer, 0)):
            self._temporal.watch(states)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._forward_order.stop()
        self._activations.detach()
        self._alarm.after_batch(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Events counted on the device after the last logging step would otherwise never be reported.
        for index in list(self._pending_metrics):
            self._flush_metrics(trainer, index)
        for monitor in self._monitors.values():
            reported = len(monitor.nonfinite)
            monitor.flush()
            self._warn_nonfinite(trainer, monitor, reported)
            final = monitor.new_alerts(judges_loss(len(self._monitors)), final=True)
            self._alarm.raise_alerts(trainer, final, monitor.prefix, stop=False)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Interrupted, preempted or crashed: what was counted so far is the most useful part of the report, which
        # says that it is partial.
        self._stopped_by = type(exception).__name__
        for monitor in self._monitors.values():
            monitor.flush()
            monitor.stopped_by = self._stopped_by
        # A fit that failed before training began (its data missing, a setting) has nothing to report.
        if self.verbose and trainer.is_global_zero and self._training and not isinstance(exception, FloatingPointError):
            rank_zero_info(self.diagnosis(pl_module))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.verbose and trainer.is_global_zero and self._monitors:
            rank_zero_info(self.diagnosis(pl_module))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._forward_order.stop()
        self._activations.detach()
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks.clear()

    # ----------------------------------------------------------------------------------------------- every step
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = optimizer_index(trainer, optimizer)
        step = trainer.global_step
        if self._observed_at.get(index) == step:  # a closure's later evaluation within the same optimizer step
            self._loss = None
            return
        self._observed_at[index] = step
        monitor = self._monitor(trainer, index, lambda: optimizer_name(pl_module, optimizer, index))
        if monitor.layers is None:
            self._forward_order.stop()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            monitor.attach(LayerIndex.build(pl_module, params, self._forward_order.order))
            if self.track_update_ratio and index not in self._step_hooks:
                self._step_hooks[index] = optimizer.register_step_post_hook(
                    lambda *args, **kwargs: self._on_optimizer_stepped(index)
                )
        monitor.discard_snapshot()  # a snapshot whose step the GradScaler skipped is stale
        self._nonfinite.before_step()
        self._flush_metrics(trainer, index)
        scaler, pending = grad_scaler(trainer), pending_grad_scaler(trainer, optimizer)
        scale = pending._scale if pending is not None else None
        own_step = self._step_index(trainer, index)
        logging_step = self._is_logging_step(own_step)
        loss, self._loss = self._loss, None
        loss_scale = getattr(scaler, "_scale", None)
        if loss is not None and isinstance(loss_scale, Tensor):
            loss = loss / loss_scale.to(loss.device)  # on_before_backward saw the GradScaler's scaled loss
        observation = monitor.observe(step, scale, amp=scaler is not None, loss=loss)
        if observation is None:
            return
        self._fit_steps[index] = self._fit_steps.get(index, 0) + 1
        if self._nonfinite.must_act(observation, amp=scaler is not None):
            self._nonfinite.act(trainer, pl_module, monitor, observation, step, lambda: self.diagnosis(pl_module))
        elif logging_step:
            monitor.note_learning_rates(
                {id(p) for group in optimizer.param_groups if _learning_rate(group) != 0 for p in group["params"]}
            )
            self._record(trainer, index, observation, step, own_step, amp=scaler is not None)
            self._alarm.raise_alerts(trainer, monitor.new_alerts(judges_loss(len(trainer.optimizers))), monitor.prefix)

    # --------------------------------------------------------------------------------------------- logging steps
    def _record(
        self, trainer: Trainer, index: int, observation: Observation, step: int, own_step: int, amp: bool
    ) -> None:
        """The detailed record of a logging step; ``own_step`` counts the optimizer's own steps, on which the
        histogram and figure cadences run (optimizers that step in turn each get their share)."""
        monitor = self._monitors[index]
        reported = len(monitor.nonfinite)
        record, activation_values = monitor.record(
            step,
            observation,
            self._activations.tensors(),
            amp=amp,
            snapshot_weights=self.track_update_ratio,
            temporal=self._temporal.take(),
        )
        self._warn_nonfinite(trainer, monitor, reported)
        if record is not None and self._activations.stats:
            monitor.dead_units = self._activations.dead_fractions(activation_values)
        if record is not None and trainer.is_global_zero:
            metrics = {
                **record_metrics(record, monitor.prefix),
                **self._activations.metrics(activation_values, monitor.prefix),
            }
            self._pending_metrics[index] = (step, metrics)  # sent with the update ratios, after the step
            if not self.track_update_ratio:
                self._flush_metrics(trainer, index)
            if monitor.layers is not None:
                self._output.pictures(
                    trainer.loggers,
                    monitor.prefix,
                    monitor.layers,
                    observation.positions,
                    record,
                    step,
                    self.flow_figure,
                    own_step,
                    final=step == self._final_step,  # the fit's last step, which always gets a record
                )
        self._activations.stats.clear()

    def _on_optimizer_stepped(self, index: int) -> None:
        """Optimizer step post-hook: add the real update ratios to the logging step's metrics and send them."""
        monitor = self._monitors.get(index)
        result = monitor.update_ratios() if monitor is not None else None
        pending = self._pending_metrics.get(index)
        if result is not None and monitor is not None and pending is not None and pending[0] == result[0]:
            pending[1].update({f"update_to_weight/{monitor.prefix}{name}": r for name, r in result[1].items()})
        if self._trainer_ref is not None:
            self._flush_metrics(self._trainer_ref, index)

    def _flush_metrics(self, trainer: Trainer, index: int) -> None:
        pending = self._pending_metrics.pop(index, None)
        if pending is not None:
            step, metrics = pending
            self._output.scalars(trainer.loggers, metrics, step)

    def flow_figure(self, names: Sequence[str], norms: Sequence[float]) -> Figure:
        """The gradient-flow figure (see `stabilize.health.flow_figure`) with this callback's thresholds."""
        largest = max((n for n in norms if math.isfinite(n)), default=1.0)
        return flow_figure(names, norms, self.criteria.vanishing_floor(largest), self.exploding_threshold)

    # --------------------------------------------------------------------------------------------------- results
    def summary(self) -> dict[str, HealthSummary]:
        """Everything the diagnosis says, as a dict (one entry per optimizer, keyed by its name: see the key table)."""
        judge_loss = judges_loss(len(self._monitors))
        return {self._name(index): monitor.summary(judge_loss) for index, monitor in sorted(self._monitors.items())}

    def _name(self, index: int) -> str:
        return self._monitors[index].prefix.rstrip("/") or f"optimizer_{index}"

    def spike_steps(self) -> list[int]:
        """The first step of every logging interval with gradient spikes, of every optimizer (transient spikes and
        explosions alike), in order: what `SharpnessMonitor` compares with the
        sharpness."""
        return sorted({event["first_step"] for monitor in self._monitors.values() for event in monitor.spikes})

    @property
    def history(self) -> list[StepRecord]:
        """The records of every logging step (of the first optimizer; see `history_of` for others)."""
        return self.history_of(min(self._monitors, default=0))

    def history_of(self, optimizer_index: int) -> list[StepRecord]:
        monitor = self._monitors.get(optimizer_index)
        return monitor.history if monitor is not None else []

    def trace_of(self, optimizer_index: int = 0) -> list[dict[str, Any]]:
        """Every step's loss and total norm of one optimizer (`StepTrace`'s points:
        ``step``, ``loss``, ``smoothed_loss``, ``steady_loss``, ``global_norm``); empty before its first step."""
        monitor = self._monitors.get(optimizer_index)
        return monitor.trace_points() if monitor is not None else []

    def save_json(self, path: str | Path) -> None:
        """Write the summary, the history and the raw spike events of every optimizer to ``path`` as JSON."""
        payload = {
            "summary": self.summary(),
            "history": {self._name(i): m.history for i, m in sorted(self._monitors.items())},
            # The raw spike events, so that a saved run can be judged again (stabilize.health.classify_spikes).
            "spikes": {self._name(i): m.spikes for i, m in sorted(self._monitors.items())},
            # Every step's loss and total norm, which the loss rules read (the same verdict at any cadence).
            "trace": {self._name(i): m.trace_points() for i, m in sorted(self._monitors.items())},
        }
        Path(path).write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False))

    def diagnosis(self, pl_module: nn.Module | None = None) -> str:
        """A readable report: what went wrong, where, since when, and what to do about it.

        With ``pl_module``, the remedies fit the model (what it lacks, what saturates) and include its own
        ``gradient_health_hints()``.
        """
        return report(self._monitors, self._every, pl_module, self._stopped_by)

    # ------------------------------------------------------------------------------------------- checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        monitors = {index: monitor.state_dict() for index, monitor in self._monitors.items()}
        return {"monitors": monitors, "forward_order": dict(self._forward_order.order)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._forward_order = ForwardOrder(state_dict.get("forward_order", {}))
        self._monitors = {
            int(index): GradientMonitor.from_state_dict(saved, self.criteria)
            for index, saved in state_dict.get("monitors", {}).items()
        }

    # ------------------------------------------------------------------------------------------------- helpers
    def _monitor(self, trainer: Trainer, index: int, name: Callable[[], str]) -> GradientMonitor:
        self._trainer_ref = trainer
        if index not in self._monitors:  # the name walks every parameter: once per optimizer, not per step
            prefix = f"{name()}/" if len(trainer.optimizers) > 1 else ""
            self._monitors[index] = GradientMonitor(self.criteria, prefix)
        return self._monitors[index]

    def _is_logging_step(self, optimizer_step: int) -> bool:
        """Whether an optimizer's ``optimizer_step``-th step (0-based) gets a detailed record: every ``_every``-th
        and the fit's last."""
        return optimizer_step % self._every == 0 or optimizer_step == self._final_step

    def _step_index(self, trainer: Trainer, index: int) -> int:
        """The upcoming step's index on the logging cadence: Lightning's own ``global_step`` with one optimizer
        (right across resumes and new fits); with several, which all advance ``global_step``, each optimizer's own
        count in the current fit."""
        return trainer.global_step if len(trainer.optimizers) <= 1 else self._fit_steps.get(index, 0)

    def _warn_nonfinite(self, trainer: Trainer, monitor: GradientMonitor, reported: int) -> None:
        if not trainer.is_global_zero or self.on_nonfinite != "warn":  # skip and raise have said it at the step
            return
        key = id(monitor)
        for event in monitor.nonfinite[reported:]:
            previous = self._nonfinite_warned.get(key)
            self._nonfinite_warned[key] = event["last_step"]
            if previous is not None and event["first_step"] <= previous + self._every:
                continue  # the same run of non-finite steps (weights gone NaN): said once
            rank_zero_warn(
                f"GradientHealthCallback: {event['tensors']} non-finite gradient tensor(s) between optimizer steps"
                f" {event['first_step']} and {event['last_step']}, in {', '.join(event['layers'][:10])}. Use"
                " on_nonfinite='skip' to drop such steps or 'raise' to stop at the first one. Non-finite steps that"
                " follow without a pause are not warned about again (the diagnosis lists them)."
            )


def _learning_rate(group: dict[str, Any]) -> float:
    """A parameter group's learning rate as a number (a tensor LR is read once, on a logging step)."""
    lr = group.get("lr", 1.0)
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def _holds_compiled_module(module: nn.Module) -> bool:
    """Whether ``module`` holds a ``torch.compile`` wrapper, registered or kept as a plain attribute."""
    candidates = [*module.modules(), *vars(module).values()]
    return any(type(candidate).__name__ == "OptimizedModule" for candidate in candidates)


__all__ = ["GradientHealthCallback", "NonFinitePolicy"]
