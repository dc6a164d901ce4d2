"""Gradient-health maths in plain torch (no Trainer): per-layer statistics, device counters, records, the
diagnosis and the figures. `GradientHealthCallback` is the Lightning plumbing over it."""

from stabilize.health.collapse import gradient_collapse
from stabilize.health.counters import DeviceCounters
from stabilize.health.criteria import HealthCriteria
from stabilize.health.diagnosis import diagnosis_lines, verdict, verdict_class
from stabilize.health.explosions import classify_spikes
from stabilize.health.figures import flow_figure, gradient_histograms
from stabilize.health.layers import LayerIndex
from stabilize.health.monitor import GradientMonitor
from stabilize.health.records import (
    DepthRatio,
    ExplosionEvent,
    GradientCollapse,
    HealthSummary,
    LayerStats,
    LossStall,
    NonFiniteEvent,
    SpikeEvent,
    StepRecord,
)
from stabilize.health.saved import judge_saved
from stabilize.health.stall import loss_stall
from stabilize.health.traits import ModelTraits, model_hints

__all__ = [
    "DepthRatio",
    "DeviceCounters",
    "ExplosionEvent",
    "GradientCollapse",
    "GradientMonitor",
    "HealthCriteria",
    "HealthSummary",
    "LayerIndex",
    "LayerStats",
    "LossStall",
    "ModelTraits",
    "NonFiniteEvent",
    "SpikeEvent",
    "StepRecord",
    "classify_spikes",
    "diagnosis_lines",
    "flow_figure",
    "gradient_collapse",
    "gradient_histograms",
    "judge_saved",
    "loss_stall",
    "model_hints",
    "verdict",
    "verdict_class",
]
