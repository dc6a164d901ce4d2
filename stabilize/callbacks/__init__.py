"""Lightning callbacks that watch the health of the gradients."""

from stabilize.callbacks.forward_statistics_monitor import ForwardStatisticsMonitor
from stabilize.callbacks.gradient_clipping import GradientClipping
from stabilize.callbacks.gradient_health import GradientHealthCallback
from stabilize.callbacks.interrupt_checkpoint import InterruptCheckpoint
from stabilize.callbacks.learning_rate_scale import LearningRateScale
from stabilize.callbacks.line_progress import LineProgress
from stabilize.callbacks.reinitialize import Reinitialize
from stabilize.callbacks.sample_quality import SampleQuality
from stabilize.callbacks.sharpness_monitor import SharpnessMonitor
from stabilize.callbacks.swap_activations import SwapActivations
from stabilize.callbacks.swap_optimizer import SwapOptimizer

__all__ = [
    "ForwardStatisticsMonitor",
    "GradientClipping",
    "GradientHealthCallback",
    "InterruptCheckpoint",
    "LearningRateScale",
    "LineProgress",
    "Reinitialize",
    "SampleQuality",
    "SharpnessMonitor",
    "SwapActivations",
    "SwapOptimizer",
]
