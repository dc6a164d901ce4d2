"""Gradient-health records for tests of the diagnosis: a quiet summary to override field by field."""

from __future__ import annotations

from typing import Any

from stabilize.health import HealthSummary


def spike(first: int, last: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A spike event of ``first``-``last`` (one step by default), transient unless ``overrides`` say otherwise."""
    last = first if last is None else last
    event = {
        "first_step": first,
        "last_step": last,
        "steps": last - first + 1,
        "max_norm": 10.0,
        "peak_ratio": 20.0,
        "longest_run": last - first + 1,
        "persistent_steps": 0,
        "ceiling_steps": 0,
        "persistent_ceiling": 0,
        "record_step": last,
    }
    return {**event, **overrides}


def health_summary(**overrides: Any) -> HealthSummary:
    """A summary of 10 steps, 4 layers and nothing wrong (but a depth ratio of 663), with ``overrides`` applied."""
    base: HealthSummary = {
        "steps": 10,
        "logged_steps": 2,
        "vanishing_layers_now": {},
        "ever_vanished": {},
        "explosions": [],
        "transient_spikes": [],
        "nonfinite": [],
        "skipped_steps": [],
        "amp_skipped_steps": 0,
        "worst_depth_ratio": {"ratio": 663.0, "step": 4},
        "worst_temporal_ratio": None,
        "last_temporal_ratio": None,
        "last_global_norm": 1.0,
        "num_layers": 4,
        "gradient_collapse": None,
    }
    return {**base, **overrides}  # type: ignore[typeddict-item]
