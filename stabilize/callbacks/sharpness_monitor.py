"""SharpnessMonitor: the loss's sharpness against the learning rate's stability limit, every N steps."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from stabilize.callbacks.random_state import preserved_random_state
from stabilize.errors import ConfigurationError, check_integers
from stabilize.health.sharpness import METHODS, Sharpness, adam_preconditioner, stability_limit, top_eigenvalue

#: Sharpness over its stability limit from which the learning rate, not the data, bounds the curvature: gradient
#: descent's sharpness hovers just below or around 1 at the Edge of Stability (Cohen et al. 2021, Fig. 1: within ~10%).
AT_THE_LIMIT = 0.9


class SharpnessMonitor(Callback):
    r"""Measure the sharpness (the largest Hessian eigenvalue of the training loss) every ``every_n_steps`` optimizer
    steps and compare it with the stability limit of the learning rate (``2 / lr`` for SGD, ``(2 + 2 momentum) / lr``
    with heavy-ball momentum, ``(2 + 2 momentum) / ((1 + 2 momentum) lr)`` with Nesterov's, dampening and weight decay
    included: `stability_limit`): at a ratio near 1 the learning rate, not the data,
    sets the curvature (the Edge of Stability, Cohen et al. 2021), and spikes are the optimizer overshooting.

    The monitor never changes the training it watches: a measurement leaves every random generator (torch's CPU and
    CUDA, Python's, NumPy's) as it found it, so dropout masks and the batch order that follow are those of a run
    without it (tested bitwise).

    The loss is the module's own ``training_step`` on one fixed batch (the first training batch, kept), with its logging
    silenced, in eval mode: BatchNorm uses its running statistics and dropout is off, so a measurement is reproducible;
    in full precision (outside the Trainer's autocast, so under AMP too). A module may define ``sharpness_loss(batch)``
    to name the loss instead; one that optimizes manually must (its ``training_step`` steps the optimizers), or the
    monitor refuses to start. The Lanczos method (or power iteration) on Hessian-vector products (double backward),
    warm-started from the previous eigenvector. Under DDP each process measures on its own first batch; rank zero's
    value is logged. With Adam or AdamW the monitor measures the *preconditioned* sharpness instead, the largest
    eigenvalue of ``P^-1 H`` with Adam's ``P = sqrt(v_hat) + eps`` read from the optimizer's state, against its limit
    ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr at beta1 = 0.9; Cohen et al. 2022). Other adaptive optimizers
    (RMSprop, Adagrad) get the plain sharpness without a limit.

    Args:
        every_n_steps: Optimizer steps between measurements (step 0 included).
        iterations: Most Hessian-vector products per measurement.
        tolerance: Where a measurement stops: Lanczos once its residual bound puts the estimate within this fraction
            of the eigenvalue, power iteration once the estimate changes by less than this fraction. The default,
            1%, is ten times finer than what the diagnosis reads (a ratio of `AT_THE_LIMIT` = 0.9) and saves a
            Hessian-vector product or three against 1e-3 (ResNet-20, ``benchmarks/bench_sharpness_methods.py``: 4
            products instead of 7 cold, -0.7% off; 4 instead of 5 warm-started, 2e-7 off).
            `top_eigenvalue`'s default is 1e-3.
        examples: Measure on the first this many examples of the batch (``None``: all of it). The cost of a
            measurement is proportional to it, but the sharpness of a small sample reads high: on ResNet-20 on
            CIFAR-10 (``benchmarks/bench_sharpness_sample.py``), 64 examples read 7-17% and 32 read 17-56% above 512,
            128 read 2-7% above (other batches of 128: -7% to +22%, the spread between batches).
        verbose: Print the summary line when ``fit`` ends.
        method: ``"lanczos"`` (the default: few Hessian-vector products, keeps up to ``iterations + 1`` copies of
            the parameters) or ``"power"`` (power iteration: two copies, slow when the top eigenvalues are close).
        at_initialisation: Also measure before the first optimizer step (at the first training batch), into
            `initial_sharpness`. The measurements of `history` are taken after an optimizer step: the one
            labelled step ``k`` after ``k + 1`` updates, so step 0's is not the initial sharpness (it depends on
            the learning rate of that first update).

    Raises:
        ConfigurationError: If ``every_n_steps``, ``iterations`` or ``examples`` is not a positive integer,
            ``tolerance`` is not positive or ``method`` unknown; when ``fit`` starts, for a manually optimized module
            without ``sharpness_loss``.

    Example:
        ```python
        trainer = Trainer(callbacks=[SharpnessMonitor(every_n_steps=50)])
        trainer.fit(model, datamodule)
        print(monitor.diagnosis())
        ```

    | key | value (at each measurement) |
    |---|---|
    | ``sharpness/max_eigenvalue`` | largest Hessian eigenvalue of the loss on the fixed batch (not Adam) |
    | ``sharpness/preconditioned`` | largest eigenvalue of ``P^-1 H`` (Adam and AdamW, instead) |
    | ``sharpness/stability_limit`` | SGD's (``stability_limit``); ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Adam) |
    | ``sharpness/ratio`` | measured eigenvalue / stability_limit (SGD, Adam) |
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        iterations: int = 20,
        tolerance: float = 1e-2,
        examples: int | None = None,
        verbose: bool = True,
        method: Literal["lanczos", "power"] = "lanczos",
        at_initialisation: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigurationError(f"method must be one of {METHODS}, got {method!r}.")
        self.method = method
        check_integers(1, every_n_steps=every_n_steps, iterations=iterations)
        if examples is not None:
            check_integers(1, examples=examples)
        self.examples = examples
        if not (isinstance(tolerance, (int, float)) and tolerance > 0):
            raise ConfigurationError(f"tolerance must be positive, got {tolerance!r}.")
        self.every_n_steps, self.iterations, self.tolerance, self.verbose = (
            every_n_steps,
            iterations,
            tolerance,
            verbose,
        )
        #: ``(step, sharpness, stability limit or None)`` of every measurement, taken after step ``step``'s update.
        self.history: list[tuple[int, float, float | None]] = []
        self.at_initialisation = at_initialisation
        #: The sharpness before any update (``at_initialisation``), ``None`` until measured.
        self.initial_sharpness: float | None = None
        self._batch: Any = None
        self._vector: list[Tensor] | None = None
        #: Whether the history holds Adam's preconditioned sharpness.
        self.preconditioned = False

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization and not callable(getattr(pl_module, "sharpness_loss", None)):
            raise ConfigurationError(
                f"SharpnessMonitor: {type(pl_module).__name__} optimizes manually, so its training_step steps the"
                " optimizers and cannot be called to measure; give it a sharpness_loss(batch) method that returns"
                " the loss whose sharpness you want (e.g. the discriminator's)."
            )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._batch is None:
            self._batch = _detached(batch, self.examples)
        if self.at_initialisation and self.initial_sharpness is None and trainer.global_step == 0:
            self.initial_sharpness = self._measure(trainer, pl_module).value

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The last optimizer step this batch took; a batch may take several (manual optimization, a GAN's two
        # networks), so the monitor measures at the first batch end in each block of every_n_steps steps.
        step = trainer.global_step - 1
        if step < 0 or (self.history and self.history[-1][0] // self.every_n_steps >= step // self.every_n_steps):
            return
        measured = self._measure(trainer, pl_module)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        limit = None if optimizer is None else stability_limit(optimizer)
        self.history.append((step, measured.value, limit))
        metrics = {f"sharpness/{'preconditioned' if self.preconditioned else 'max_eigenvalue'}": measured.value}
        if limit is not None:
            metrics |= {"sharpness/stability_limit": limit, "sharpness/ratio": measured.value / limit}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> Sharpness:
        """One measurement on the kept batch (warm-started from the last eigenvector, which it replaces), leaving
        every random generator as it found it."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        preconditioner = None if optimizer is None else adam_preconditioner(optimizer, params)
        self.preconditioned = preconditioner is not None
        if self._vector is not None and [v.shape for v in self._vector] != [p.shape for p in params]:
            self._vector = None  # the parameters changed (a resumed run with another model): start afresh
        own = getattr(pl_module, "sharpness_loss", None)
        measured_loss = own if callable(own) else (lambda batch: pl_module.training_step(batch, 0))
        was_training = pl_module.training
        pl_module.eval()
        try:
            devices = list({p.device for p in params})
            with _silenced_logging(pl_module), torch.enable_grad(), preserved_random_state(devices):
                measured = top_eigenvalue(
                    lambda: _loss(measured_loss(self._batch)),
                    params,
                    self.iterations,
                    self.tolerance,
                    start=self._vector,
                    preconditioner=preconditioner,
                    method=self.method,
                )
        finally:
            pl_module.train(was_training)
        self._vector = measured.vector
        return measured

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.verbose and trainer.is_global_zero and self.history:
            # Any callback that reports gradient spikes (GradientHealthCallback.spike_steps) is asked for them.
            sources = [getattr(c, "spike_steps", None) for c in trainer.callbacks]  # type: ignore[attr-defined]
            spikes = sorted({step for source in sources if callable(source) for step in source()})
            rank_zero_info(self.diagnosis(spikes))

    def spikes_at_the_limit(self, spike_steps: Sequence[int]) -> tuple[list[int], list[int]]:
        """Split ``spike_steps`` into those whose latest measurement before them was at the limit (ratio at least
        `AT_THE_LIMIT`: the optimizer overshooting the curvature it climbed to) and the others (a hard batch,
        or a cause the sharpness does not see). Steps before the first measurement, or without a limit, are others."""
        at_limit, others = [], []
        for spike in spike_steps:
            before = [(step, value, limit) for step, value, limit in self.history if step <= spike]
            if before and before[-1][2] is not None and before[-1][1] / before[-1][2] >= AT_THE_LIMIT:
                at_limit.append(spike)
            else:
                others.append(spike)
        return at_limit, others

    def diagnosis(self, spike_steps: Sequence[int] = ()) -> str:
        """One line: the last sharpness against the stability limit and what the ratio means; with the steps of
        gradient spikes, a second line saying which came while the sharpness was at the limit."""
        if not self.history:
            return "Sharpness: not measured."
        line = self._sharpness_line()
        if not spike_steps or all(limit is None for _, _, limit in self.history):
            return line
        at_limit, others = self.spikes_at_the_limit(spike_steps)
        if not at_limit:
            return f"{line}\nGradient spikes at steps {_steps(others)}: none came while the sharpness was at the limit."
        return (
            f"{line}\nGradient spikes at steps {_steps(at_limit)} came while the sharpness was at the limit (ratio"
            f" >= {AT_THE_LIMIT} at the measurement before each): the learning rate, not the data, made them"
            + (f"; those at steps {_steps(others)} did not." if others else ".")
        )

    def _sharpness_line(self) -> str:
        step, value, limit = self.history[-1]
        peak_step, peak, _ = max(self.history, key=lambda item: item[1])
        what = "Preconditioned sharpness (Adam's P^-1 H)" if self.preconditioned else "Sharpness"
        if limit is None:
            return (
                f"{what} {value:.4g} at step {step} (peak {peak:.4g} at step {peak_step}); no stability limit at"
                " that step: SGD and Adam have one, other optimizers do not, and a learning rate of 0 (the end of a"
                " schedule) has none."
            )
        ratio = value / limit
        meaning = (
            "the learning rate sets the curvature (the Edge of Stability): spikes are the optimizer overshooting;"
            " a lower learning rate or a warm-up moves the limit"
            if ratio >= AT_THE_LIMIT
            else "below the limit: the learning rate is not what bounds the curvature"
        )
        return (
            f"{what} {value:.4g} at step {step} against the stability limit {limit:.4g} of the learning rate"
            f" (ratio {ratio:.2f}; peak {peak:.4g} at step {peak_step}): {meaning}."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "vector": self._vector,
            "preconditioned": self.preconditioned,
            "initial_sharpness": self.initial_sharpness,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(value), limit) for step, value, limit in state_dict.get("history", [])]
        self._vector = state_dict.get("vector")
        self.preconditioned = bool(state_dict.get("preconditioned", False))
        self.initial_sharpness = state_dict.get("initial_sharpness")


def _steps(steps: Sequence[int], shown: int = 8) -> str:
    listed = ", ".join(str(step) for step in steps[:shown])
    return listed + (f" and {len(steps) - shown} more" if len(steps) > shown else "")


def _loss(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise ConfigurationError(
            "SharpnessMonitor needs a training_step that returns the loss (or a dict with 'loss')."
        )
    return loss


def _detached(batch: Any, examples: int | None = None) -> Any:
    """A copy of ``batch`` that training cannot change, cut to its first ``examples`` examples (along the first
    dimension of every tensor) when given."""
    if isinstance(batch, Tensor):
        kept = batch if examples is None or batch.ndim == 0 else batch[:examples]
        return kept.detach().clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_detached(item, examples) for item in batch)
    if isinstance(batch, dict):
        return {key: _detached(value, examples) for key, value in batch.items()}
    return batch


@contextmanager
def _silenced_logging(module: LightningModule) -> Any:
    """The module's ``self.log`` does nothing inside: a measurement is not a training step."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log
