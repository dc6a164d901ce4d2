"""The explosion rules' counting written step by step, as the monitor counted before it counted chunks of steps:
the reference the chunked count (:mod:`stabilize.health.spike_counting`) must agree with."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stabilize.health.counters import DeviceCounters
from stabilize.health.criteria import CEILING_LOSS_FLOOR, CEILING_PERSISTENCE, HealthCriteria


def count_step_by_step(
    criteria: HealthCriteria,
    norms: list[Tensor],
    losses: list[Tensor | None],
    steps: list[int],
    layer_index: Tensor,
    amp: bool = False,
    recent: list[float] = (),  # type: ignore[assignment]
) -> DeviceCounters:
    """Counters after observing each step's per-tensor ``norms`` (with a window filled from ``recent`` first)."""
    counters = DeviceCounters.zeros(int(layer_index.max()) + 1, torch.device("cpu"))
    window = torch.full((criteria.median_window,), math.nan)
    recent = list(recent)[-criteria.median_window :]
    window[: len(recent)] = torch.tensor(recent) if recent else window[:0]
    position = len(recent)
    for step, step_norms, loss in zip(steps, norms, losses):
        tensor_nonfinite = ~torch.isfinite(step_norms)
        step_nonfinite = tensor_nonfinite.any()
        counted = step_norms.square().sum().sqrt().float()
        if amp:
            counters.amp_skipped += step_nonfinite
        else:
            counters.nonfinite_tensors += tensor_nonfinite.sum()
            counters.nonfinite_first = torch.where(
                step_nonfinite & (counters.nonfinite_first < 0), step, counters.nonfinite_first
            )
            counters.nonfinite_last = torch.where(step_nonfinite, step, counters.nonfinite_last)
            counters.layer_nonfinite.index_add_(0, layer_index, tensor_nonfinite.float())
        finite = ~step_nonfinite
        median = torch.nanmedian(window)
        torch.maximum(counters.max_norm, torch.where(finite, counted, 0.0), out=counters.max_norm)
        if loss is not None:
            loss = loss.float()
            counters.loss_sum += loss
            counters.loss_count += 1
        count_spikes(criteria, counters, step, counted, median, finite, loss, position >= criteria.judged_after)
        window[position % criteria.median_window] = torch.where(finite, counted, torch.nan)
        position += 1
    return counters


def count_spikes(
    criteria: HealthCriteria,
    counters: DeviceCounters,
    step: int,
    total: Tensor,
    median: Tensor,
    finite: Tensor,
    loss: Tensor | None,
    judged: bool,
) -> None:
    """Add this step to ``counters``: a spike when ``total`` exceeds ``exploding_factor`` x the running ``median``
    (only once ``judged``: a median of one early step says nothing) or is out of range (:func:`out_of_range`), and
    the runs of spikes and of out-of-range steps. Device ops only, no host sync."""
    if judged:
        spike = finite & (total > criteria.exploding_factor * median)
        ratio = total / median
    else:
        spike, ratio = torch.zeros_like(finite), torch.zeros_like(total)
    beyond = out_of_range(criteria, counters, total, finite, loss)
    if beyond is not None:
        counters.ceiling_steps += beyond
        counters.ceiling_run.add_(1).mul_(beyond)
        counters.persistent_ceiling += beyond & (counters.ceiling_run >= CEILING_PERSISTENCE)
        spike = spike | beyond
    counters.spikes += spike
    counters.spike_first = torch.where(spike & (counters.spike_first < 0), step, counters.spike_first)
    counters.spike_last = torch.where(spike, step, counters.spike_last)
    counters.spike_max_norm = torch.where(spike, torch.maximum(counters.spike_max_norm, total), counters.spike_max_norm)
    higher = spike & (torch.nan_to_num(ratio, 0.0) > counters.spike_max_ratio)
    counters.spike_peak_step = torch.where(higher, step, counters.spike_peak_step)
    counters.spike_max_ratio = torch.where(spike, torch.fmax(counters.spike_max_ratio, ratio), counters.spike_max_ratio)
    counters.spike_run.add_(1).mul_(spike)
    torch.maximum(counters.spike_longest_run, counters.spike_run, out=counters.spike_longest_run)
    counters.persistent_spikes += spike & (counters.spike_run >= criteria.spike_persistence)


def out_of_range(
    criteria: HealthCriteria, counters: DeviceCounters, total: Tensor, finite: Tensor, loss: Tensor | None
) -> Tensor | None:
    """Whether the step's norm is above a ceiling, on the device: ``exploding_threshold``, or
    ``gradient_to_loss_ceiling`` x the loss's magnitude (judged once the loss is above ``CEILING_LOSS_FLOOR`` x the
    first one). ``None`` when no ceiling applies."""
    flags: list[Tensor] = []
    if criteria.exploding_threshold is not None:
        flags.append(finite & (total > criteria.exploding_threshold))
    if criteria.gradient_to_loss_ceiling is not None and loss is not None:
        size = loss.abs()
        known = torch.isfinite(size)
        counters.first_loss.copy_(torch.where(known & (counters.first_loss < 0), size, counters.first_loss))
        judged = finite & known & (size >= CEILING_LOSS_FLOOR * counters.first_loss)
        flags.append(judged & (total > criteria.gradient_to_loss_ceiling * size))
    if not flags:
        return None
    return flags[0] if len(flags) == 1 else flags[0] | flags[1]
