"""Gradient-health records for tests of the diagnosis: a quiet summary to override field by field."""

from __future__ import annotations

from typing import Any

from stabilize.health import HealthSummary


def health_summary(**overrides: Any) -> HealthSummary:
    """A summary of 10 steps, 4 layers and nothing wrong (but a depth ratio of 663), with ``overrides`` applied."""
    base: HealthSummary = {
        "steps": 10,
        "logged_steps": 2,
        "vanishing_layers_now": {},
        "ever_vanished": {},
        "explosions": [],
        "nonfinite": [],
        "skipped_steps": [],
        "amp_skipped_steps": 0,
        "worst_depth_ratio": {"ratio": 663.0, "step": 4},
        "worst_temporal_ratio": None,
        "last_global_norm": 1.0,
        "num_layers": 4,
        "gradient_collapse": None,
    }
    return {**base, **overrides}  # type: ignore[typeddict-item]
