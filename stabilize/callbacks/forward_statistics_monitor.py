"""ForwardStatisticsMonitor: a model's own forward statistics (residual stream, attention and output logits) at
logging steps, with the findings they support."""

from __future__ import annotations

from typing import Any, cast

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from stabilize.errors import ConfigurationError
from stabilize.health.forward_statistics import (
    ForwardRecord,
    ForwardStatisticsSource,
    attention_peak,
    findings,
    output_peak,
    read_statistics,
    residual_growth,
)

#: Advice per finding when the module's ``forward_statistics_hints()`` has none of its own.
DEFAULT_HINTS = {
    "attention_logits": "normalize queries and keys (QK-norm) or lower the learning rate",
    "output_logits": "add a z-loss on the output logits or lower the learning rate",
}


class ForwardStatisticsMonitor(Callback):
    """Log and diagnose the statistics a model measures of its own forward pass
    (`ForwardStatisticsSource`: a transformer's residual-stream RMS per
    block, largest attention logit per layer, largest output logit), every ``log_every_n_steps`` optimizer steps.

    The monitor asks for a measurement by setting the module's ``record_forward_statistics`` for the training batches
    of logging steps only (materialising attention logits beside a fused kernel costs a matmul per layer), and reads
    all of a step's values in one host transfer; between logging steps nothing is measured or synchronised. When
    ``fit`` ends it prints the findings (``diagnosis()``): attention logits above
    `ATTENTION_LOGIT_LIMIT` (attention-logit growth, Wortsman et al.
    2023: QK-norm or a lower LR), output logits above `OUTPUT_LOGIT_LIMIT`
    (output-logit divergence: z-loss), each with the step and layer of its largest value; with neither, one line
    with the largest values and the residual stream's growth over depth. A module's ``forward_statistics_hints()``
    (keys ``"attention_logits"``, ``"output_logits"``) words the advice in its own flags. A module that does not
    implement the protocol is left alone (one info line).

    Args:
        log_every_n_steps: Optimizer steps between measurements (step 0 included); ``None``: the Trainer's
            ``log_every_n_steps``.
        verbose: Print the diagnosis when ``fit`` ends.

    Raises:
        ConfigurationError: If ``log_every_n_steps`` is not a positive integer or ``None``.

    Example:
        ```python
        monitor = ForwardStatisticsMonitor()
        Trainer(callbacks=[GradientHealthCallback(), monitor]).fit(TransformerLM(), CharTextDataModule())
        print(monitor.diagnosis())
        ```

    | key | value (at each measured step) |
    |---|---|
    | ``forward/block_rms/<i>`` | RMS of the residual stream after block ``i`` |
    | ``forward/attention_logit_max/<i>`` | largest scaled query-key product of block ``i`` (causal positions) |
    | ``forward/output_logit_max`` | largest absolute output logit |
    """

    def __init__(self, log_every_n_steps: int | None = None, verbose: bool = True) -> None:
        super().__init__()
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ConfigurationError(
                f"log_every_n_steps must be a positive integer or None, got {log_every_n_steps!r}."
            )
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        self.records: list[ForwardRecord] = []
        self._hints: dict[str, str] = {}
        self._measuring = False

    def _every(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or max(getattr(trainer, "log_every_n_steps", 1), 1)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, ForwardStatisticsSource):
            rank_zero_info(
                f"ForwardStatisticsMonitor: {type(pl_module).__name__} measures no forward statistics"
                " (record_forward_statistics / forward_statistics); nothing to monitor."
            )
        hints = getattr(pl_module, "forward_statistics_hints", None)
        own = hints() if callable(hints) else {}
        self._hints = {kind: own.get(kind, default) for kind, default in DEFAULT_HINTS.items()}

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._measuring = (
            isinstance(pl_module, ForwardStatisticsSource) and trainer.global_step % self._every(trainer) == 0
        )
        if self._measuring:
            cast(ForwardStatisticsSource, pl_module).record_forward_statistics = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._measuring:
            return
        self._measuring = False
        source = cast(ForwardStatisticsSource, pl_module)
        source.record_forward_statistics = False
        statistics, source.forward_statistics = source.forward_statistics, {}
        if not statistics:
            return
        # The batch's optimizer step has run: the step it was measured at is one before the current count.
        record = read_statistics(trainer.global_step - 1, statistics)
        self.records.append(record)
        for logger in trainer.loggers:
            logger.log_metrics({f"forward/{key}": value for key, value in record.values.items()}, step=record.step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.verbose and self.records and trainer.is_global_zero:
            rank_zero_info(self.diagnosis())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": [(record.step, record.values) for record in self.records]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [ForwardRecord(int(step), dict(values)) for step, values in state_dict.get("records", [])]

    def diagnosis(self) -> str:
        """The findings in plain words, or one line of the largest values when there are none."""
        found = findings(self.records)
        if found:
            return "\n".join(
                finding.sentence(self._hints.get(finding.kind, DEFAULT_HINTS[finding.kind])) for finding in found
            )
        if not self.records:
            return "Forward statistics: nothing measured."
        attention, output = attention_peak(self.records), output_peak(self.records)
        growth = residual_growth(self.records[-1])
        parts = [
            *([f"largest attention logit {attention.value:.3g}"] if attention is not None else []),
            *([f"largest output logit {output.value:.3g}"] if output is not None else []),
            *([f"residual stream {growth:.3g}x from the first block to the last"] if growth is not None else []),
        ]
        return f"Forward statistics healthy over {len(self.records)} records: {', '.join(parts)}."
