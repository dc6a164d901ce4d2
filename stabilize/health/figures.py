"""Pictures of gradient health: the gradient-flow figure and per-layer gradient histograms.

The figure is a `matplotlib.figure.Figure` built without pyplot, so drawing it never switches the
matplotlib backend of the caller's process (a notebook keeps its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor

from stabilize.health.layers import LayerIndex
from stabilize.health.norms import stored_values

HISTOGRAM_BINS = 64
#: Layer labels on the depth axis, at most: more are unreadable at TensorBoard's card size (~500 px wide).
_MAX_TICKS = 14


def flow_figure(
    names: Sequence[str],
    norms: Sequence[float],
    vanishing_floor: float,
    exploding_threshold: float | None,
    title: str = "Gradient flow",
) -> Figure:
    """Layer gradient norm against depth on a log axis, with the vanishing band (below ``vanishing_floor``) and the
    exploding band (above ``exploding_threshold``, when one is set) shaded. Layers with a zero or non-finite norm,
    which a log axis cannot show, are marked on its lower and upper edges."""
    finite = [n if math.isfinite(n) and n > 0 else math.nan for n in norms]
    shown = [n for n in finite if math.isfinite(n)]
    # A fixed size: TensorBoard shows figures scaled to its card's width, so a wider figure only shrinks the text.
    figure = Figure(figsize=(7.0, 4.2), dpi=90)
    # Fixed margins instead of tight_layout, which costs a full extra layout pass per drawing.
    # The left margin holds the y label beside tick labels as wide as 1e-20.
    figure.subplots_adjust(left=0.12, right=0.98, top=0.92, bottom=0.32)
    axis = figure.add_subplot()
    depth = list(range(len(names)))
    axis.plot(depth, finite, marker="o", markersize=3, linewidth=1.2, color="#1f77b4", label="layer grad norm")
    largest = max(shown, default=1.0)
    low = min([*shown, vanishing_floor]) / 10
    high = max(largest * 10, (exploding_threshold or 0.0) * 10)
    axis.axhspan(low, vanishing_floor, color="#d62728", alpha=0.12, label="vanishing")
    if exploding_threshold is not None:
        axis.axhspan(exploding_threshold, exploding_threshold * 100, color="#ff7f0e", alpha=0.12, label="exploding")
    axis.set_yscale("log")
    axis.set_ylim(low, high)
    for where, label, marker, y in (
        ([i for i, n in enumerate(norms) if n == 0], "exactly zero", "x", low * 1.5),
        ([i for i, n in enumerate(norms) if not math.isfinite(n)], "non-finite", "^", high / 1.5),
    ):
        if where:
            axis.scatter(where, [y] * len(where), marker=marker, color="#d62728", s=24, zorder=3, label=label)
    axis.set_xlabel("layer (forward order)")
    axis.set_ylabel("gradient L2 norm")
    stride = max(1, len(names) // _MAX_TICKS)
    axis.set_xticks(depth[::stride])
    labels = short_names(names)
    axis.set_xticklabels([labels[i] for i in depth[::stride]], rotation=60, ha="right", fontsize=8)
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title)
    return figure


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``network.stages.0.1.conv2`` -> ``stages.0.1.conv2``
    when every layer is under ``network.``), so that axis labels stay short."""
    parts = [name.split(".") for name in names]
    shared = 0
    while parts and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    # Indices alone ("0.0" ... "19.2", the blocks of an nn.Sequential) read as numbers: keep the last shared name.
    while shared and all(part.isdigit() for p in parts for part in p[shared:]):
        shared -= 1
    return [".".join(p[shared:]) for p in parts]


def temporal_figure(norms: Sequence[float], title: str = "Gradient over time steps") -> Figure:
    """‖∂L/∂h_t‖ against the time step t on a log axis: flat when credit reaches the first steps, falling toward
    t = 0 by orders of magnitude when long-range credit assignment is lost, rising when it explodes."""
    figure = Figure(figsize=(6.0, 3.5), dpi=80)
    figure.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.15)
    axis = figure.add_subplot()
    steps = [t for t, n in enumerate(norms) if math.isfinite(n) and n > 0]
    axis.plot(steps, [norms[t] for t in steps], linewidth=1.2, color="#1f77b4")
    axis.set_yscale("log")
    axis.set_xlabel("time step t")
    axis.set_ylabel("gradient norm of the state h_t")
    axis.set_title(title)
    return figure


class Histogram(NamedTuple):
    """A layer's gradient histogram in TensorBoard's raw form."""

    name: str
    num: int
    min: float
    max: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


def gradient_histograms(layers: LayerIndex, positions: tuple[int, ...], magnitude: bool = False) -> list[Histogram]:
    """Per-layer histograms of the gradients at ``positions``, binned on the device: only 64 counts and five
    statistics per layer travel to the host, in one transfer. Layers with non-finite gradients are left out.

    ``magnitude``: histograms of ``log10 |g|`` over the non-zero gradient values instead, whose axis reads in
    orders of magnitude (-7 for 1e-7) where the plain histogram of tiny values is a smear of ``0.0000…`` labels;
    exact zeros are left out of it (the plain histogram counts them)."""
    by_layer: dict[int, list[Tensor]] = {}
    for position in positions:
        grad = layers.params[position].grad
        if grad is not None:
            by_layer.setdefault(layers.layer_of_param[position], []).append(grad)
    if not by_layer:
        return []
    rows: list[Tensor] = []
    sizes: list[int | None] = []
    for grads in by_layer.values():
        # Sparse gradients: their stored values; complex ones: their modulus.
        parts = [stored_values(g.detach()) for g in grads]
        values = torch.cat([(p.abs() if p.is_complex() else p).flatten().float() for p in parts])
        # The magnitudes leave out the zeros by masks, not indexing: the count of the rest stays on the device (no
        # host sync); the plain histogram keeps every value and counts them on the host, exactly.
        left_out = values == 0 if magnitude else None
        if magnitude:
            values = values.abs().clamp(min=torch.finfo(torch.float32).tiny).log10()
        sizes.append(None if magnitude else values.numel())
        low, high = _without(values, left_out, math.inf).min(), _without(values, left_out, -math.inf).max()
        width = (high - low).clamp(min=torch.finfo(torch.float32).tiny)
        bins = ((values - low) / width * HISTOGRAM_BINS).nan_to_num().long().clamp_(0, HISTOGRAM_BINS - 1)
        # Left-out values go to one bin more, dropped: weights would be simpler, but a weighted bincount on CUDA
        # raises under torch.use_deterministic_algorithms.
        counts = torch.bincount(_without(bins, left_out, HISTOGRAM_BINS), minlength=HISTOGRAM_BINS + 1).float()
        values = _without(values, left_out, 0)
        # Exact up to 2**24 non-zero values (float32), TensorBoard's informational "num" above.
        count = values.new_full((), math.nan) if left_out is None else (~left_out).sum().float()
        statistics = torch.stack([low, high, values.sum(), values.square().sum(), count])
        rows.append(torch.cat([statistics, counts[:HISTOGRAM_BINS]]))
    histograms = []
    for layer, size, row in zip(by_layer, sizes, torch.stack(rows).tolist()):
        low, high, total, squares, count = row[:5]
        size = count if size is None else size
        if all(math.isfinite(v) for v in row[:4]):
            limits = [low + (high - low) * (k + 1) / HISTOGRAM_BINS for k in range(HISTOGRAM_BINS)]
            histograms.append(Histogram(layers.names[layer], int(size), low, high, total, squares, limits, row[5:]))
    return histograms


def _without(values: Tensor, left_out: Tensor | None, fill: float) -> Tensor:
    """``values`` with the ``left_out`` entries set to ``fill`` (no mask: ``values`` itself, no copy)."""
    return values if left_out is None else values.masked_fill(left_out, fill)
