"""Lightning callbacks that watch the health of the gradients."""

from stabilize.callbacks.gradient_health import GradientHealthCallback

__all__ = ["GradientHealthCallback"]
