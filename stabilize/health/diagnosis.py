"""The diagnosis: a gradient-health summary in plain words, with remedies that fit the model.

Pure functions of the records, so they work on a saved ``save_json`` file as well as on a live callback.

A model may add its own advice by defining ``gradient_health_hints()``, returning a mapping from
``"vanishing"``, ``"exploding"`` or ``"nonfinite"`` to one sentence (e.g. the stabilized variant of the same
architecture in its own library, or the command-line flag of its warm-up). The generic remedies stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from stabilize.health.judgements import judges_loss
from stabilize.health.records import ExplosionEvent, HealthSummary, LossBlowup, SpikeEvent, StepRecord
from stabilize.health.traits import ModelTraits, model_hints, vanishing_remedies

if TYPE_CHECKING:
    from stabilize.health.monitor import GradientMonitor

#: What the verdict's worst finding is: `verdict_class`'s values.
VERDICT_CLASSES = ("healthy", "vanishing", "exploding", "unstable", "collapse", "stalled")
#: An update of about this fraction of a layer's weights per step is the usual healthy scale of Adam-family training.
USUAL_UPDATE_TO_WEIGHT = 1e-3
#: Below this ratio of the gradient at t=0 to the last step's, credit no longer reaches the sequence's start.
TEMPORAL_VANISHING = 1e-3
#: A recurrent run whose training loss fell by at least this fraction learned what it was asked: a small gradient
#: at t=0 at the end is then no finding (a tanh RNN that learned to recall a token 60 steps back, 1.38 -> 0.10,
#: still read 1e-4: once a memory is held, its gradient back to t=0 decays). The failing runs stay at their start.
TEMPORAL_LEARNED = 0.5
_LISTED_LAYERS = 12
#: Why an explosion counts as one, in words (``ExplosionEvent["rule"]``).
RULE_WORDS = {
    "persistent": "stayed far above its median for consecutive steps",
    "nonfinite": "non-finite gradients followed",
    "loss": "the training loss never came back below its level before",
    "ceiling": "out of range (above gradient_to_loss_ceiling x the loss, or exploding_threshold) steps in a row",
}


def verdict(summary: HealthSummary) -> str:
    """One line naming every finding of the run, worst first (``"healthy"`` when there is none); transient spikes,
    which training shrugged off, follow as a note with where to find them: ``"healthy; 3 transient spikes (peak
    37x the median at step 120, each over within 1 step)"``."""
    findings = []
    if summary["nonfinite"] or summary["skipped_steps"]:
        findings.append(f"non-finite gradients (from step {_first_nonfinite(summary)})")
    if summary["explosions"]:
        findings.append(_explosion_words(summary["explosions"]))
    blowups = summary.get("loss_blowups", [])
    kept = [b for b in blowups if not b["recovered"]]
    if kept:
        findings.append(_blowup_words(kept[0]))
    if summary["vanishing_layers_now"]:
        findings.append(f"vanishing ({len(summary['vanishing_layers_now'])}/{summary['num_layers']} layers)")
    temporal = summary.get("last_temporal_ratio")
    if temporal is not None and vanishing_through_time(summary):
        findings.append(f"vanishing through time (t=0 gets {temporal['ratio']:.0e} of the last step's gradient)")
    dead = summary.get("dead_units", {})
    if dead:
        findings.append(f"dead units ({len(dead)} activation module{'s' if len(dead) > 1 else ''} at least half dead)")
    collapse = summary.get("gradient_collapse")
    if collapse:
        findings.append(f"gradient collapsed ({collapse['factor']:.0f}x down)")
    stall = summary.get("loss_stall")
    if stall:
        findings.append(
            f"loss stalled ({stall['end_loss']:.3g} at the end, {stall['level']:.3g} at step {stall['since_step']})"
        )
    line = ", ".join(findings) if findings else "healthy"
    stopped = summary.get("stopped_by")
    if stopped:
        # A crashed run is never called healthy: the steps it did not take were not seen.
        line = f"stopped by {stopped} after {summary['steps']} steps (partial; {', '.join(findings) or 'no finding'})"
    notes = [_spike_words(summary["transient_spikes"])] if summary.get("transient_spikes") else []
    recovered = [b for b in blowups if b["recovered"]]
    if recovered:
        notes.append(
            f"{len(recovered)} loss spike{'s' if len(recovered) > 1 else ''} recovered from (peak"
            f" {max(b['peak_loss'] / b['best_before'] for b in recovered):.3g}x the best before, from step"
            f" {recovered[0]['onset_step']})"
        )
    return "; ".join([line, *notes])


def _blowup_words(blowup: LossBlowup) -> str:
    after = (
        "still up at the end"
        if blowup["back_step"] is None
        else f"ended at {blowup['end_loss']:.3g} against {blowup['start_loss']:.3g} at the start"
    )
    return (
        f"unstable (the loss blew up from step {blowup['onset_step']} to {blowup['peak_loss']:.3g},"
        f" {blowup['peak_loss'] / blowup['best_before']:.3g}x its best before, and did not recover: {after})"
    )


def vanishing_through_time(summary: HealthSummary) -> bool:
    """Whether the run's gradient vanished through time: at t=0 below `TEMPORAL_VANISHING` of the last step's
    at the last record, in a run whose loss did not fall by `TEMPORAL_LEARNED` (it did not learn anyway)."""
    temporal = summary.get("last_temporal_ratio")
    progress = summary.get("loss_progress")
    learned = progress is not None and progress >= TEMPORAL_LEARNED
    return temporal is not None and temporal["ratio"] < TEMPORAL_VANISHING and not learned


def verdict_class(summary: HealthSummary) -> str:
    """The kind of the verdict's worst finding, one of `VERDICT_CLASSES`: non-finite gradients count as
    exploding (their usual cause; a log(0) is told apart by the diagnosis's remedies), a loss blow-up the run did
    not recover from as unstable (the gradient rules had no evidence: an adaptive optimizer at too high a learning
    rate), vanishing layers and vanishing through time as vanishing; a stalled loss with none of those is
    ``"stalled"`` (the gradients are not its
    cause); a run that recovered from vanishing (said in the diagnosis, not in the verdict: which steps are logged
    depends on the cadence), recovered loss spikes and transient spikes are healthy."""
    if summary["nonfinite"] or summary["skipped_steps"] or summary["explosions"]:
        return "exploding"
    if any(not b["recovered"] for b in summary.get("loss_blowups", [])):
        return "unstable"
    if summary["vanishing_layers_now"] or vanishing_through_time(summary) or summary.get("dead_units"):
        return "vanishing"
    if summary.get("gradient_collapse"):
        return "collapse"
    if summary.get("loss_stall"):
        return "stalled"
    return "healthy"


def _first_nonfinite(summary: HealthSummary) -> int:
    return min([e["first_step"] for e in summary["nonfinite"]] + summary["skipped_steps"])


def _explosion_words(explosions: list[ExplosionEvent]) -> str:
    steps = sum(e["steps"] for e in explosions)
    worst = max(explosions, key=lambda e: e["peak_ratio"])
    rules = "/".join(dict.fromkeys(e["rule"] for e in explosions))
    # An event out of range from the start (the ceiling rule) has no median far below it: name its norm instead.
    peak = f"{worst['peak_ratio']:.0f}x the median" if worst["peak_ratio"] >= 2 else f"norm {worst['max_norm']:.3g}"
    plural = "s" if steps > 1 else ""
    return f"exploding ({steps} step{plural} from step {explosions[0]['first_step']}, peak {peak}; {rules})"


def _spike_words(spikes: list[SpikeEvent]) -> str:
    count = sum(e["steps"] for e in spikes)
    worst = max(spikes, key=lambda e: e["peak_ratio"])
    longest = max(e["longest_run"] for e in spikes)
    plural = "s" if count > 1 else ""
    # The peak's own step where the counters kept it (the same at any logging cadence); an older record's span.
    peak_step = worst.get("peak_step", -1)
    span = f"{worst['first_step']}" if worst["steps"] == 1 else f"{worst['first_step']}-{worst['last_step']}"
    return (
        f"{count} transient spike{plural} (peak {worst['peak_ratio']:.0f}x the median at step"
        f" {peak_step if peak_step >= 0 else span}, each over within {longest} step{'s' if longest > 1 else ''})"
    )


def report(
    monitors: Mapping[int, GradientMonitor],
    every: int,
    module: nn.Module | None = None,
    stopped_by: str | None = None,
) -> str:
    """The whole diagnosis: a title and `diagnosis_lines` per optimizer; with ``module``, remedies fit it.
    ``stopped_by``: the class name of the exception that stopped training, when one did (a partial diagnosis)."""
    traits = ModelTraits.of(module) if module is not None else None
    hints = model_hints(module)
    if not monitors and stopped_by:
        return f"Gradient health, partial: fit stopped by {stopped_by} after 0 optimizer steps; no gradient was seen."
    lines = []
    for index, monitor in sorted(monitors.items()):
        name = monitor.prefix.rstrip("/") or f"optimizer {index}"
        title = "Gradient health" + (f" of the {name}" if len(monitors) > 1 else "")
        stopped = monitor.stopped_by
        if stopped:
            title += f", partial: fit stopped by {stopped}"
        lines.append(f"{title} after {monitor.steps} optimizer steps (details every {every}):")
        last = monitor.history[-1] if monitor.history else None
        summary = monitor.summary(judge_loss=judges_loss(len(monitors)))
        lines += diagnosis_lines(summary, last, traits, network_hints(hints, monitor.prefix))
    return "\n".join(lines)


def network_hints(hints: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The hints for one optimizer: a model's ``"<network>/<kind>"`` hints (e.g. ``"generator/vanishing"``) replace
    its plain ``"<kind>"`` ones for the optimizer named ``<network>``; other networks' hints are dropped."""
    plain = {kind: text for kind, text in hints.items() if "/" not in kind}
    own = {kind.split("/", 1)[1]: text for kind, text in hints.items() if prefix and kind.startswith(prefix)}
    return {**plain, **own}


def diagnosis_lines(
    summary: HealthSummary,
    last: StepRecord | None,
    traits: ModelTraits | None = None,
    hints: Mapping[str, str] | None = None,
) -> list[str]:
    """The diagnosis of one optimizer: findings, then one ``What to do:`` line (or ``Healthy``)."""
    hints = hints or {}
    lines: list[str] = []
    remedies: list[str] = []
    vanishing = summary["vanishing_layers_now"]
    if vanishing and last is not None:
        names = list(vanishing)
        lines.append(f"  VANISHING: {len(names)} of {summary['num_layers']} layers get almost no gradient:")
        width = max(len(name) for name in names[:_LISTED_LAYERS])
        for name in names[:_LISTED_LAYERS]:
            lines.append(
                f"    {name:<{width}}  grad norm {last['layers'][name]['grad_norm']:.2e}"
                f"  vanishing since step {vanishing[name]}"
            )
        if len(names) > _LISTED_LAYERS:
            lines.append(f"    ... and {len(names) - _LISTED_LAYERS} more")
        dead = sum(last["layers"][name]["grad_norm"] == 0.0 for name in names)
        # The model's own advice first: it knows its architecture (a transformer already has residual connections).
        remedies += [hints["vanishing"]] if "vanishing" in hints else []
        remedies += vanishing_remedies(traits, dead)
    elif summary["ever_vanished"]:
        lines.append(f"  Vanishing earlier but recovered: {', '.join(list(summary['ever_vanished'])[:5])}.")
    else:
        lines.append("  Vanishing: none.")
    dead_units = summary.get("dead_units", {})
    if dead_units:
        listed = ", ".join(f"{name} {fraction:.0%}" for name, fraction in list(dead_units.items())[:6])
        lines.append(f"  DEAD UNITS: channels with no positive output in the whole batch: {listed}.")
        if not vanishing:
            remedies += vanishing_remedies(traits, len(dead_units))
    collapse = summary.get("gradient_collapse")
    if collapse:
        lines.append(
            f"  COLLAPSED: the total gradient norm fell {collapse['factor']:,.0f}x, from {collapse['from_norm']:.2e}"
            f" (around step {collapse['from_step']}) to {collapse['to_norm']:.2e}, and has stayed down since step"
            f" {collapse['since_step']}: every layer gets little learning signal, although none is below the"
            " vanishing floor."
        )
        remedies.append(
            "a collapsed gradient usually means a saturated loss or output (a classifier already certain of its"
            " outputs, sigmoid/softmax outputs pinned at 0 or 1, a GAN discriminator that wins outright): check"
            " the loss and the outputs' range"
        )
        remedies += [hints["vanishing"]] if "vanishing" in hints else []
    stall = summary.get("loss_stall")
    if stall:
        lines.append(
            f"  STALLED: the training loss has not fallen since step {stall['since_step']}: {stall['end_loss']:.4g}"
            f" over the last tenth of the run against {stall['level']:.4g} then (it started at"
            f" {stall['start_loss']:.4g}), so the model learned little beyond its first steps."
        )
        remedies += [hints["stalled"]] if "stalled" in hints else []
        remedies.append(
            "a stalled loss: try another learning rate (too low moves nothing; too high without a warm-up can stall"
            " a network at its start), add a warm-up, and check that labels and inputs match"
        )
    ratio = summary["worst_depth_ratio"]
    if ratio is not None:
        lines.append(
            f"  Worst depth ratio (first layer / last layer gradient norm): {ratio['ratio']:.2e} at step"
            f" {ratio['step']} ({_depth_ratio_meaning(ratio['ratio'])})."
        )
    temporal = summary.get("last_temporal_ratio")
    worst_temporal = summary.get("worst_temporal_ratio")
    if temporal is not None:
        worst = (
            f"; at worst {worst_temporal['ratio']:.1e} (step {worst_temporal['step']})"
            if worst_temporal is not None and worst_temporal["step"] != temporal["step"]
            else ""
        )
        lines.append(
            f"  Temporal: the gradient at t=0 is {temporal['ratio']:.1e} of the gradient at the last step"
            f" (step {temporal['step']}){_temporal_meaning(temporal['ratio'])}{worst}."
        )
        progress = summary.get("loss_progress")
        if temporal["ratio"] < TEMPORAL_VANISHING and not vanishing_through_time(summary) and progress is not None:
            lines.append(f"  The loss fell {progress:.0%} all the same: the run learned, so this is no finding.")
        if vanishing_through_time(summary):
            remedies.append(
                "long-range credit assignment is lost: gated cells (LSTM, GRU) or an orthogonal/identity recurrent"
                " init keep the gradient alive over time"
            )
    lines += _blowup_lines(summary, remedies, traits, hints)
    if summary["explosions"]:
        explosions = summary["explosions"]
        peak = max(e["max_norm"] for e in explosions)
        steps = sum(e["steps"] for e in explosions)
        lines.append(
            f"  EXPLODING: {steps} step(s) far above the running median (steps {_spans(explosions)}; peak {peak:.3g})."
        )
        for rule in dict.fromkeys(e["rule"] for e in explosions):
            lines.append(
                f"    rule '{rule}': {RULE_WORDS[rule]} ({_spans([e for e in explosions if e['rule'] == rule])})"
            )
        clip = (
            "self.clip_gradients(optimizer, 1.0) before each optimizer.step() (manual optimization)"
            if traits is not None and traits.manual_optimization
            else "Trainer(gradient_clip_val=1.0)"
        )
        remedies.append(f"clip gradients ({clip}), lower the learning rate or add a learning-rate warm-up")
        if traits is not None and not traits.normalization:
            remedies.append("add normalization (e.g. BatchNorm), which undoes the gain of each layer")
        remedies += [hints["exploding"]] if "exploding" in hints else []
    else:
        lines.append("  Exploding: none.")
    spikes = summary.get("transient_spikes", [])
    if spikes:
        lines.append(
            f"  Transient: {_spike_words(spikes)} at steps {_spans(spikes)}; training went on (no persistent run,"
            " the loss came back, no non-finite values): hard batches, not an explosion."
        )
    if summary["nonfinite"] or summary["skipped_steps"]:
        events = summary["nonfinite"]
        layers = list(dict.fromkeys(name for e in events for name in e["layers"]))
        where = f" in {', '.join(layers[:6])}" if layers else ""
        first = min([e["first_step"] for e in events] + summary["skipped_steps"])
        lines.append(
            f"  NON-FINITE gradients from step {first}{where}; {len(summary['skipped_steps'])} step(s) skipped."
        )
        remedies.append(
            "non-finite gradients: lower the learning rate, clip gradients, check the loss for log(0)"
            " or division by zero, prefer bf16-mixed over 16-mixed"
        )
        remedies += [hints["nonfinite"]] if "nonfinite" in hints else []
    else:
        lines.append("  Non-finite gradients: none.")
    if summary["amp_skipped_steps"]:
        lines.append(
            f"  AMP: the GradScaler skipped {summary['amp_skipped_steps']} step(s) with overflowing fp16"
            " gradients (a few while it calibrates are normal; not counted as explosions)."
        )
    lines += coverage_lines(summary)
    if remedies:
        lines.append("  What to do: " + "; ".join(dict.fromkeys(remedies)) + ".")
    elif summary.get("stopped_by"):
        lines.append("  No gradient problem before it stopped: a partial diagnosis, not a verdict on the run.")
    else:
        lines.append("  Healthy: no action needed.")
    return lines


def _blowup_lines(
    summary: HealthSummary, remedies: list[str], traits: ModelTraits | None, hints: Mapping[str, str]
) -> list[str]:
    """The loss blow-ups of the diagnosis; appends the remedies of unrecovered ones to ``remedies``."""
    lines = []
    for blowup in summary.get("loss_blowups", []):
        back = (
            "it stayed up to the end" if blowup["back_step"] is None else f"back below it at step {blowup['back_step']}"
        )
        outcome = (
            "the run recovered and learned on"
            if blowup["recovered"]
            else f"the run did not recover: {blowup['end_loss']:.4g} over the last tenth against"
            f" {blowup['start_loss']:.4g} at the start"
        )
        lines.append(
            f"  {'Loss spike' if blowup['recovered'] else 'UNSTABLE'}: the smoothed training loss rose from"
            f" {blowup['best_before']:.4g} to {blowup['peak_loss']:.4g} (step {blowup['peak_step']}), above twice its"
            f" best from step {blowup['onset_step']}; {back}; {outcome}."
        )
    if any(not b["recovered"] for b in summary.get("loss_blowups", [])):
        update = summary.get("largest_update_to_weight")
        if update:
            lines.append(
                f"    Largest update of a layer at a logged step: {update['ratio']:.2g} of its weights"
                f" ({update['layer']}, step {update['step']}; Adam-family training usually moves"
                f" ~{USUAL_UPDATE_TO_WEIGHT:g} per step)."
            )
        remedies += [hints["unstable"]] if "unstable" in hints else []
        remedies.append(
            "the loss blew up while the gradient need not (an adaptive optimizer normalises its step): lower the"
            " learning rate (3-10x), add or lengthen a learning-rate warm-up, clip gradients"
        )
        if traits is not None and traits.attention:
            remedies.append(
                "for attention: QK-norm (normalise queries and keys) or a z-loss on the output logits keeps logits"
                " from growing"
            )
    return lines


def coverage_lines(summary: HealthSummary) -> list[str]:
    """What the numbers cover: tied weights counted once, layers that do not learn (a learning rate of 0, or no
    gradient at all: not used by the loss, or cut off by a ``detach``)."""
    lines = []
    shared = summary.get("shared_parameters", {})
    if shared:
        ties = "; ".join(f"{', '.join(others)} is {name}" for name, others in shared.items())
        lines.append(f"  Shared parameters (counted once): {ties}.")
    reasons = []
    if summary.get("zero_lr_layers"):
        reasons.append(f"learning rate 0: {_names(summary['zero_lr_layers'])}")
    if summary.get("never_gradient_layers"):
        reasons.append(f"never received a gradient: {_names(summary['never_gradient_layers'])}")
    if reasons:
        lines.append(f"  Not learning: {'; '.join(reasons)}.")
    return lines


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _spans(events: list[ExplosionEvent] | list[SpikeEvent], limit: int = 8) -> str:
    spans = [
        f"{e['first_step']}-{e['last_step']}" if e["first_step"] != e["last_step"] else str(e["first_step"])
        for e in events[:limit]
    ]
    return ", ".join(spans) + (f" and {len(events) - limit} more" if len(events) > limit else "")


def _temporal_meaning(ratio: float) -> str:
    if ratio < TEMPORAL_VANISHING:
        return ": long-range credit assignment is lost"
    if ratio > 1e3:
        return ": the gradient grows backward through time, the signature of exploding recurrent gradients"
    return ": credit reaches the first steps"


def _depth_ratio_meaning(ratio: float) -> str:
    if ratio < 1e-3:
        return "below 1e-3: the input side learns far slower than the output side, gradient vanishes toward the input"
    if ratio <= 1:
        return "between 1e-3 and 1: the input side gets somewhat less gradient than the output side, as is usual"
    return (
        "above 1: the input side gets more gradient than the output side, as normalization layers often make it;"
        " harmless unless steps explode"
    )
