"""The spike and out-of-range counting of one step, on the device: the every-step half of the explosion rules
(:mod:`stabilize.health.explosions` judges the counted events at the end)."""

from __future__ import annotations

import torch
from torch import Tensor

from stabilize.health.counters import DeviceCounters
from stabilize.health.criteria import CEILING_LOSS_FLOOR, CEILING_PERSISTENCE, HealthCriteria


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
    flags = []
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
