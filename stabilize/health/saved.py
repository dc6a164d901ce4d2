"""Judge a saved run again: the summaries of a ``GradientHealthCallback.save_json`` file under the current rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stabilize.health.criteria import HealthCriteria
from stabilize.health.judgements import judgements, judges_loss
from stabilize.health.records import HealthSummary


def judge_saved(saved: Mapping[str, Any], criteria: HealthCriteria | None = None) -> dict[str, HealthSummary]:
    """Each optimizer's summary of a ``save_json`` payload with the judgements of the current rules: spikes split
    into explosions and transient spikes (:func:`~stabilize.health.classify_spikes` on the raw events), the
    gradient collapse and the loss stall, all from the saved records. What the records themselves hold (vanishing
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
        judged = judgements(history, spikes or [], summary["nonfinite"], criteria, judge_loss, split)
        summaries[name] = {**summary, **judged}  # type: ignore[typeddict-item]  # the saved summary has the rest
    return summaries
