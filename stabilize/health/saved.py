"""Judge a saved run again: the summaries of a ``GradientHealthCallback.save_json`` file under the current rules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stabilize.health.criteria import HealthCriteria
from stabilize.health.judgements import judgements, judges_loss
from stabilize.health.records import HealthSummary
from stabilize.health.trace import TracePoint


def judge_saved(saved: Mapping[str, Any], criteria: HealthCriteria | None = None) -> dict[str, HealthSummary]:
    """Each optimizer's summary of a ``save_json`` payload with the judgements of the current rules: spikes split
    into explosions and transient spikes (`classify_spikes` on the raw events), the
    gradient collapse, the loss stall and blow-ups, from the saved per-step trace (from the records in a file saved
    before the trace existed, which has no blow-ups). What the records themselves hold (vanishing
    layers, depth ratios, dead units, non-finite events) is kept as saved, and so is the split of spikes in a file
    written before ``save_json`` kept the raw events. ``criteria``: those the run used
    (``HealthCriteria()``, the callback's defaults, when ``None``)."""
    criteria = criteria or HealthCriteria()
    summaries: dict[str, HealthSummary] = {}
    judge_loss = judges_loss(len(saved["summary"]))
    for name, summary in saved["summary"].items():
        history = saved["history"][name]
        spikes = saved.get("spikes", {}).get(name)
        # A file written before save_json kept the raw events: its saved split of spikes stands.
        split = None if spikes is not None else (summary["explosions"], summary["transient_spikes"])
        trace = [_point(p) for p in saved.get("trace", {}).get(name, [])]
        judged = judgements(history, spikes or [], summary["nonfinite"], criteria, judge_loss, split, trace or None)
        summaries[name] = {**summary, **judged}  # type: ignore[typeddict-item]  # the saved summary has the rest
    return summaries


def _point(saved: Mapping[str, Any]) -> TracePoint:
    """A saved trace point; JSON's null (a NaN when saved) back to NaN."""
    return {
        "step": int(saved["step"]),
        "loss": _number(saved["loss"]),
        "smoothed_loss": _number(saved["smoothed_loss"]),
        "steady_loss": _number(saved["steady_loss"]),
        "global_norm": _number(saved["global_norm"]),
    }


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)
