"""Statistics of a forward pass that a model measures itself (the residual stream's scale per block, the largest
attention logit per layer, the output logits' scale) and the findings they support: attention-logit growth and
output-logit divergence, the two instabilities of Wortsman et al. (2023) that precede a transformer's loss spikes.

Plain torch and Python: no Trainer. `ForwardStatisticsMonitor` is the plumbing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

#: Names of the statistics, as the prefix of a key ``"<statistic>/<layer>"`` (``"output_logit_max"`` has no layer).
BLOCK_RMS = "block_rms"
ATTENTION_LOGIT_MAX = "attention_logit_max"
OUTPUT_LOGIT_MAX = "output_logit_max"

#: Largest attention logit (a query-key dot product after its scaling) above which a finding is reported. Softmax over
#: a causal window turns a logit gap of ~20 into a one-hot attention already. In the transformer grid
#: (docs/results/transformer) every run that trained well stayed at or below 56 (QK-norm runs: 13 at most), and every
#: pre-LN run that QK-norm beat at the same LR by 0.4 nats or more reached 635 or more: 200 lies between the two
#: with a factor of ~3 of margin on either side (Wortsman et al.'s unstable runs grow to 1e4).
ATTENTION_LOGIT_LIMIT = 2e2
#: Largest absolute output logit above which a finding is reported: a language model's healthy logits are tens at
#: most (a probability of e^-30 is already negligible); logits in the hundreds are the output-logit divergence that
#: z-loss prevents.
OUTPUT_LOGIT_LIMIT = 1e2


@runtime_checkable
class ForwardStatisticsSource(Protocol):
    """A module that measures its own forward pass when ``record_forward_statistics`` is true (the monitor sets it at
    logging steps only, so the extra work, e.g. materialising attention logits, is paid only then) and leaves the
    values in ``forward_statistics``: device scalars keyed ``"<statistic>/<layer>"`` (``block_rms/0``,
    ``attention_logit_max/3``, ``output_logit_max``), read by the monitor in one host transfer.
    `TransformerLM` implements it."""

    record_forward_statistics: bool
    forward_statistics: dict[str, Tensor]


@dataclass(frozen=True)
class ForwardRecord:
    """The statistics of one measured step, as host floats."""

    step: int
    values: dict[str, float]

    def layers(self, statistic: str) -> list[tuple[int, float]]:
        """``(layer, value)`` of one statistic, by layer."""
        found = []
        for key, value in self.values.items():
            name, _, layer = key.partition("/")
            if name == statistic and layer.isdigit():
                found.append((int(layer), value))
        return sorted(found)


def read_statistics(step: int, statistics: Mapping[str, Tensor]) -> ForwardRecord:
    """One host transfer for every value of a step (stacked on the device first)."""
    keys = list(statistics)
    if not keys:
        return ForwardRecord(step, {})
    values = torch.stack([statistics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
    return ForwardRecord(step, dict(zip(keys, values)))


@dataclass(frozen=True)
class Finding:
    kind: str  # "attention_logits" or "output_logits"
    step: int
    value: float
    layer: int | None
    first: float

    def sentence(self, hint: str) -> str:
        where = f" in layer {self.layer}" if self.layer is not None else ""
        if self.kind == "attention_logits":
            return (
                f"Attention logits grow: max {self.value:.3g}{where} at step {self.step} (first record"
                f" {self.first:.3g}; softmax is one-hot beyond ~20): {hint}."
            )
        return (
            f"Output logits diverge: max |logit| {self.value:.3g} at step {self.step} (first record"
            f" {self.first:.3g}): {hint}."
        )


@dataclass(frozen=True)
class Peak:
    """The largest value of a statistic over the records: where it was, and what it was at the first record."""

    value: float
    step: int
    layer: int | None
    first: float


def attention_peak(records: Sequence[ForwardRecord]) -> Peak | None:
    """The largest attention logit of any layer, or ``None`` without one."""
    values = [(value, r.step, layer) for r in records for layer, value in r.layers(ATTENTION_LOGIT_MAX)]
    if not values:
        return None
    value, step, layer = max(values)
    return Peak(value, step, layer, dict(records[0].layers(ATTENTION_LOGIT_MAX)).get(layer, float("nan")))


def output_peak(records: Sequence[ForwardRecord]) -> Peak | None:
    """The largest absolute output logit, or ``None`` without one."""
    values = [(r.values[OUTPUT_LOGIT_MAX], r.step) for r in records if OUTPUT_LOGIT_MAX in r.values]
    if not values:
        return None
    value, step = max(values)
    return Peak(value, step, None, values[0][0])


def findings(records: Sequence[ForwardRecord]) -> list[Finding]:
    """Attention-logit growth (a layer's largest attention logit above `ATTENTION_LOGIT_LIMIT`) and output-logit
    divergence (the largest absolute output logit above `OUTPUT_LOGIT_LIMIT`), each at its largest record."""
    found = []
    for kind, peak, limit in (
        ("attention_logits", attention_peak(records), ATTENTION_LOGIT_LIMIT),
        ("output_logits", output_peak(records), OUTPUT_LOGIT_LIMIT),
    ):
        if peak is not None and peak.value > limit:
            found.append(Finding(kind, peak.step, peak.value, peak.layer, peak.first))
    return found


def residual_growth(record: ForwardRecord) -> float | None:
    """The residual stream's RMS after the last block over that after the first (how much the stream grows with
    depth), or ``None`` without two blocks."""
    blocks = record.layers(BLOCK_RMS)
    if len(blocks) < 2 or blocks[0][1] <= 0:
        return None
    return blocks[-1][1] / blocks[0][1]
