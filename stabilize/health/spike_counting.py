"""The every-step half of the explosion rules, counted on the device for a chunk of steps at once
(`stabilize.health.explosions` judges the counted events at the end).

Counting each step as it comes takes some sixty tiny tensor operations, most of a millisecond of host time per step;
the monitor therefore keeps each step's gradient norms (already on the device) and counts a chunk of steps in one
vectorised pass: at a logging step, when the chunk is full, or when anything reads the counters. The result is the
one a step-by-step count gives (the tests hold a step-by-step reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stabilize.health.counters import DeviceCounters
from stabilize.health.criteria import CEILING_LOSS_FLOOR, CEILING_PERSISTENCE, HealthCriteria


@dataclass
class StepChunk:
    """Device values of consecutive optimizer steps, oldest first.

    Attributes:
        steps: The steps' numbers, ``(C,)`` long.
        norms: Each step's per-tensor gradient norms, ``(C, P)`` (unscaled by any GradScaler).
        losses: The training loss of each step that had one, ``(L,)``, in step order.
        judged: Whether the relative rule judges each step (its running-median window held enough steps), ``(C,)``.
        amp: Whether a GradScaler owns non-finite steps (counted as ``amp_skipped``, never as events).
        loss_index: Positions (in the chunk) of the steps in ``losses``; ``None`` when every step has a loss.
    """

    steps: Tensor
    norms: Tensor
    losses: Tensor | None
    judged: Tensor
    amp: bool
    loss_index: Tensor | None = None


def count_chunk(
    criteria: HealthCriteria, counters: DeviceCounters, history: Tensor, chunk: StepChunk, layer_index: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Add the chunk's steps to ``counters`` as a step-by-step count would: a spike when a step's total norm exceeds
    ``exploding_factor`` x the median of the finite norms of the ``median_window`` steps before it (once
    ``judged``) or is out of range (`out_of_range`); runs of spikes and of out-of-range steps (continued from
    the counters' running state); non-finite tensors per layer; the interval's largest norm and loss sum.

    ``history`` holds the window before the chunk (oldest first, NaN where no finite norm); ``layer_index`` maps the
    columns of ``chunk.norms`` to layers. Returns the window after the chunk, the median before each step and each
    step's total norm (float32, which the monitor's per-step trace keeps). Device ops only, no host sync.
    """
    norms = chunk.norms
    size = len(chunk.steps)
    totals = norms.square().sum(1).sqrt().float()  # the counters are float32 whatever the model's precision
    tensor_nonfinite = ~torch.isfinite(norms)
    step_nonfinite = tensor_nonfinite.any(1)
    finite = ~step_nonfinite
    if chunk.amp:
        counters.amp_skipped += step_nonfinite.sum()
    else:
        counters.nonfinite_tensors += tensor_nonfinite.sum()
        _note_first_and_last(counters, "nonfinite", step_nonfinite, chunk.steps)
        counters.layer_nonfinite.index_add_(0, layer_index, tensor_nonfinite.float().sum(0))
    window = history.numel()
    extended = torch.cat([history, torch.where(finite, totals, torch.nan)])
    medians = torch.nanmedian(extended.unfold(0, window, 1)[:size], dim=1).values
    torch.maximum(counters.max_norm, torch.where(finite, totals, 0.0).max(), out=counters.max_norm)
    losses = chunk.losses
    if losses is not None:
        losses = losses.detach().float()
        counters.loss_sum += losses.sum()
        counters.loss_count += len(losses)
    spike = chunk.judged & finite & (totals > criteria.exploding_factor * medians)
    ratio = torch.where(chunk.judged, totals / medians, 0.0)
    beyond = out_of_range(criteria, counters, totals, finite, losses, chunk.loss_index)
    if beyond is not None:
        counters.ceiling_steps += beyond.sum()
        ceiling_run = _runs(beyond, counters.ceiling_run)
        counters.persistent_ceiling += (beyond & (ceiling_run >= CEILING_PERSISTENCE)).sum()
        spike = spike | beyond
    counters.spikes += spike.sum()
    _note_first_and_last(counters, "spike", spike, chunk.steps)
    torch.maximum(counters.spike_max_norm, torch.where(spike, totals, 0.0).max(), out=counters.spike_max_norm)
    # A ratio is NaN where no median exists yet: such a spike (out of range) has no ratio, as fmax ignores NaN.
    spike_ratios = torch.where(spike, ratio, 0.0).nan_to_num(0.0)
    peak_ratio = spike_ratios.max()
    peak_step = _at(chunk.steps, torch.argmax(spike_ratios))  # the first step of the chunk's largest ratio
    counters.spike_peak_step.copy_(
        torch.where(peak_ratio > counters.spike_max_ratio, peak_step, counters.spike_peak_step)
    )
    counters.spike_max_ratio.copy_(torch.fmax(counters.spike_max_ratio, peak_ratio))
    spike_run = _runs(spike, counters.spike_run)
    torch.maximum(counters.spike_longest_run, spike_run.max(), out=counters.spike_longest_run)
    counters.persistent_spikes += (spike & (spike_run >= criteria.spike_persistence)).sum()
    return extended[-window:], medians, totals


def out_of_range(
    criteria: HealthCriteria,
    counters: DeviceCounters,
    totals: Tensor,
    finite: Tensor,
    losses: Tensor | None,
    loss_index: Tensor | None,
) -> Tensor | None:
    """Which steps' norms are above a ceiling, on the device: ``exploding_threshold``, or
    ``gradient_to_loss_ceiling`` x the loss's magnitude (judged once the loss is above ``CEILING_LOSS_FLOOR`` x the
    first finite one, which the counters keep). ``None`` when no ceiling applies to any step of the chunk; a step
    without a loss is then never out of range by the loss rule."""
    beyond = None
    if criteria.exploding_threshold is not None:
        beyond = finite & (totals > criteria.exploding_threshold)
    if criteria.gradient_to_loss_ceiling is not None and losses is not None:
        size = losses.abs()
        if loss_index is not None:  # only some steps have a loss
            size = torch.full_like(totals, torch.nan).index_copy_(0, loss_index, size)
        known = torch.isfinite(size)
        first_known = _at(size, torch.argmax(known.to(torch.uint8)))
        reference = torch.where(counters.first_loss >= 0, counters.first_loss, first_known)
        counters.first_loss.copy_(torch.where(known.any(), reference, counters.first_loss))
        judged = finite & known & (size >= CEILING_LOSS_FLOOR * reference)
        flag = judged & (totals > criteria.gradient_to_loss_ceiling * size)
        beyond = flag if beyond is None else beyond | flag
    return beyond


def _runs(flags: Tensor, carried: Tensor) -> Tensor:
    """Length of the run of consecutive ``True`` ending at each position (0 where ``False``), continuing a run of
    ``carried`` steps that ended just before the first position; ``carried`` becomes the run at the last position."""
    index = torch.arange(len(flags), device=flags.device)
    last_false = torch.cummax(torch.where(flags, -1, index), dim=0).values
    runs = torch.where(last_false < 0, index + 1 + carried, index - last_false)
    carried.copy_(runs[-1])
    return runs


def _note_first_and_last(counters: DeviceCounters, kind: str, flags: Tensor, steps: Tensor) -> None:
    """Set ``{kind}_first`` (if still unset) and ``{kind}_last`` from the steps where ``flags`` holds."""
    first, last = getattr(counters, f"{kind}_first"), getattr(counters, f"{kind}_last")
    any_flag = flags.any()
    as_bytes = flags.to(torch.uint8)
    first_step = _at(steps, torch.argmax(as_bytes))
    last_step = _at(steps, len(flags) - 1 - torch.argmax(as_bytes.flip(0)))
    first.copy_(torch.where(any_flag & (first < 0), first_step, first))
    last.copy_(torch.where(any_flag, last_step, last))


def _at(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for a device scalar ``index``, without the host read that indexing with a 0-d tensor does."""
    return values.index_select(0, index.reshape(1)).reshape(())
