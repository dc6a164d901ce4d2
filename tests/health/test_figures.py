"""The histograms GradientHealthCallback writes, from gradients set by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilize.health.figures import HISTOGRAM_BINS, gradient_histograms
from stabilize.health.layers import LayerIndex


def layer_with_gradient(values: list[float]) -> tuple[LayerIndex, tuple[int, ...]]:
    layer = nn.Linear(len(values), 1, bias=False)
    layer.weight.grad = torch.tensor([values])
    layers = LayerIndex.build(layer, layer.parameters())
    return layers, (0,)


def test_the_magnitude_histogram_reads_in_orders_of_magnitude_and_leaves_zeros_out() -> None:
    layers, positions = layer_with_gradient([0.0, 1e-7, -1e-6, 1e-5, 0.0])
    (plain,) = gradient_histograms(layers, positions)
    assert plain.num == 5 and sum(plain.bucket_counts) == 5  # zeros counted
    assert (plain.min, plain.max) == pytest.approx((-1e-6, 1e-5))
    (magnitude,) = gradient_histograms(layers, positions, magnitude=True)
    assert magnitude.num == 3 and sum(magnitude.bucket_counts) == 3  # the zeros left out
    # log10 of float32 values: exact to float32 rounding of 1e-7 (~1e-14 absolute), far inside 1e-5.
    assert (magnitude.min, magnitude.max) == pytest.approx((-7.0, -5.0), abs=1e-5)
    assert magnitude.sum == pytest.approx(-18.0, abs=1e-4) and magnitude.sum_squares == pytest.approx(110.0, abs=1e-3)
    assert len(magnitude.bucket_limits) == HISTOGRAM_BINS and magnitude.bucket_limits[-1] == magnitude.max
    # -7 in the first bucket, -5 in the last, -6 at the middle (on the edge of two buckets: either, by rounding).
    first, middle, last = [i for i, c in enumerate(magnitude.bucket_counts) if c]
    assert (first, last) == (0, HISTOGRAM_BINS - 1) and middle in (HISTOGRAM_BINS // 2 - 1, HISTOGRAM_BINS // 2)


def test_a_layer_of_zeros_or_non_finite_gradients_has_no_histogram_of_magnitudes() -> None:
    zeros, positions = layer_with_gradient([0.0, 0.0])
    assert len(gradient_histograms(zeros, positions)) == 1 and gradient_histograms(zeros, positions, True) == []
    broken, positions = layer_with_gradient([1.0, math.inf])
    assert gradient_histograms(broken, positions) == [] and gradient_histograms(broken, positions, True) == []
