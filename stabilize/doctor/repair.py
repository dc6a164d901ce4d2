"""The doctor: probe a run, try the remedies its findings call for, and report which one works.

Like Lightning's ``Tuner.lr_find``, it trains short copies of the user's run and never touches the run itself:
every trial builds a fresh model from the same factory and seed, trains it for the probe's number of steps and is
judged by its *outcome* (did the loss learn, against the probe and the trivial baseline) and by its own verdict.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback

from stabilize.callbacks.learning_rate_scale import LearningRateScale
from stabilize.doctor.remedies import Findings, Remedy, learning_rate, plan
from stabilize.doctor.trial import LEARNED_FRACTION, DataSource, ModelFactory, Trial, run_trial
from stabilize.errors import ConfigurationError, check_integers
from stabilize.health.traits import ModelTraits
from stabilize.models.variants import declared_variants

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class DoctorResult:
    """What the doctor did: the probe, the trials in the order tried, and the remedy that works (if any).

    ``trials`` holds the remedies in the order tried. `ranked` orders them: those that repaired the run first, then
    by the monitored metric (when there is one) or the final loss, then in the order tried; `best` is the first of
    them that works.
    """

    probe: Trial
    trials: list[Trial] = field(default_factory=list)
    steps: int = 0
    #: Why the doctor stopped, in words.
    conclusion: str = ""
    #: The metric trials are judged by (None: the training loss) and whether lower (``"min"``) or higher is better.
    monitor: str | None = None
    mode: str = "min"

    @property
    def healthy(self) -> bool:
        """The probe was healthy: nothing was tried."""
        return self.probe.verdict_class == "healthy"

    @property
    def best(self) -> Trial | None:
        ranked = self.ranked()
        return ranked[0] if ranked and ranked[0].works else None

    def ranked(self) -> list[Trial]:
        def key(trial: Trial) -> tuple[bool, float]:
            return (not trial.works, outcome_of(trial, self.monitor, self.mode)[1])

        # A stable sort: trials without a loss or metric to rank them (a GAN's, unmonitored) keep the plan's order,
        # most likely first.
        return sorted(self.trials, key=key)

    @property
    def cost(self) -> float:
        """The whole doctor run's time as a multiple of the probe's."""
        total = self.probe.seconds + sum(t.seconds for t in self.trials)
        return total / max(self.probe.seconds, 1e-9)

    def table(self) -> str:
        """The ranked trials as a Markdown table, the probe last."""
        metric = f" {self.monitor} |" if self.monitor else ""
        rows = [
            f"| remedy | verdict | loss at start | final loss |{metric} time | repaired |",
            f"|---|---|---:|---:|{'---:|' if metric else ''}---:|:-:|",
        ]
        for trial in [*self.ranked(), self.probe]:
            value = f" {_loss(trial.final_metric)} |" if metric else ""
            rows.append(
                f"| {trial.name} | {trial.verdict_class} | {_loss(trial.start_loss)} | {_loss(trial.final_loss)} |"
                f"{value} {trial.seconds:.0f} s | {'yes' if trial.works else ('-' if trial.remedy is None else 'no')} |"
            )
        return "\n".join(rows)

    def report(self) -> str:
        """The table, the conclusion and the winning change in words."""
        lines = [f"probe: {self.probe.verdict}", "", self.table(), "", self.conclusion]
        if self.best is not None and self.best.remedy is not None:
            lines.append(f"In Python: {self.best.remedy.python()}")
        return "\n".join(lines)

    def plot(self) -> Figure:
        """The smoothed training loss of the probe and of every trial against the step, on a linear scale up to
        twice the lowest starting loss (a run that blew up leaves the frame, and its label says so)."""
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
        runs = [self.probe, *self.trials]
        starts = [t.start_loss for t in runs if t.start_loss is not None and math.isfinite(t.start_loss)]
        top = 2 * min(starts) if starts else None
        for trial in runs:
            if trial.curve:
                steps, losses = zip(*trial.curve)
                style = {"color": "black", "linewidth": 2} if trial.remedy is None else {"linewidth": 1.2}
                label = f"{trial.name}: {trial.verdict_class}" + (" (repaired)" if trial.works else "")
                if top is not None and not all(math.isfinite(v) and v <= top for v in losses):
                    label += " (leaves the frame)"
                axes.plot(steps, losses, label=label, **style)
        if top is not None:
            axes.set_ylim(0, top)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss (8-step median)")
        axes.set_title("stabilize doctor: the probe and the remedies tried")
        axes.legend(fontsize=8)
        return figure


def doctor(
    model: ModelFactory,
    data: DataSource,
    steps: int = 200,
    seed: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    callbacks: Callable[[], list[Callback]] | None = None,
    max_trials: int = 8,
    try_all: bool = False,
    baseline_loss: float | None = None,
    log: Callable[[str], None] | None = None,
    monitor: str | None = None,
    mode: str = "min",
) -> DoctorResult:
    """Probe a run for ``steps`` optimizer steps and, when its verdict is not healthy, try the remedies its findings
    call for (`plan`), each at the same budget and seed.

    A trial *repairs* the run when its verdict is healthy (or one its remedy tolerates: a clipped run's raw gradient
    may still read exploding) and, for a single-optimizer run, its final loss (the median of its last 32 steps) is
    below the probe's and at most 0.9x the trivial baseline: ``baseline_loss`` (e.g. ln 10 for ten balanced classes)
    or else the smallest loss any run started at; and when the probe learned before it failed, the final loss keeps
    at least half of the progress the probe had made at its best (32-step median).

    With a ``monitor`` (a metric the module logs with ``self.log``: a GAN's sample quality, a validation accuracy),
    trials are judged and ranked by it instead of the loss: a trial repairs when its verdict is healthy (or
    tolerated) and its final value (the median of its last 32 training values, or one validation pass after
    training when the module logs it only in validation) is better than the probe's and than its own first value.
    A run of several optimizers (a GAN) has no single loss: without a monitor its trials are judged by verdict
    alone and ranked in the plan's order.

    The doctor stops one family after the first family of remedies that repairs (a second opinion, so that two cures
    are ranked; a family such as "LR /10, /100" goes one step further while that lowers the final loss;
    ``try_all``: tries the whole plan), after ``max_trials`` trials, or when the plan is spent; when no single
    remedy works and trials are left, it tries at most `COMBINATIONS` pairs: a remedy that cured the verdict
    but did not learn with the others, lowest final loss first, then the two that brought the loss lowest.

    Args:
        model: Returns a new LightningModule, the same one at every call (the seed is set before each call).
        data: A LightningDataModule or training DataLoader, or a callable returning one.
        steps: The probe's budget in optimizer steps, which every trial gets too.
        seed: Seed of every run.
        trainer_kwargs: Trainer arguments of the user's run (accelerator, precision, ...); the doctor sets
            ``max_steps``, turns off logging, checkpointing and validation, and adds its callbacks.
        callbacks: Returns the run's own callbacks that change training (clipping, a GradientHealthCallback with
            its settings), fresh at every call; checkpointing and logging callbacks do not belong here.
        max_trials: The most remedies (and combinations) tried.
        try_all: Try every remedy of the plan up to ``max_trials`` instead of stopping at the first that works.
        baseline_loss: The task's trivial loss (what predicting the prior scores).
        log: Called with a line after the probe and after each trial (e.g. ``print``).
        monitor: The metric to judge trials by (None: the training loss).
        mode: ``"min"`` when a lower ``monitor`` is better, ``"max"`` when higher is.

    Raises:
        ConfigurationError: If ``steps`` or ``max_trials`` is not a positive integer, ``mode`` is neither
            ``"min"`` nor ``"max"``, or the probe never logs ``monitor``.

    Example:
        ```python
        result = doctor(lambda: MyNet(lr=0.5), datamodule, steps=200, log=print)
        print(result.report())
        result.plot().savefig("doctor.png")
        ```

    """
    check_integers(1, steps=steps, max_trials=max_trials)
    if baseline_loss is not None and not (math.isfinite(baseline_loss) and baseline_loss > 0):
        raise ConfigurationError(f"baseline_loss must be a positive number, got {baseline_loss}.")
    if mode not in ("min", "max"):
        raise ConfigurationError(f"mode must be 'min' or 'max', got {mode!r}.")
    say = log or (lambda line: None)
    kwargs = dict(trainer_kwargs or {})
    own = callbacks or list

    def trial(remedy: Remedy | None) -> Trial:
        result = run_trial(model, data, remedy, steps, seed, kwargs, own, template, monitor)
        if remedy is not None:
            result.works = repaired(result, probe, baseline_loss, [probe, *tried], monitor, mode)
            tried.append(result)
        mark = "" if remedy is None else ("  -> repaired" if result.works else "  -> not repaired")
        mark += f"  ({result.error.split('. ')[0]})" if result.error else ""  # its first sentence
        value = f" {monitor} {_loss(result.final_metric):>8}" if monitor else ""
        say(f"{result.name:<28} {result.verdict_class:<10} final loss {_loss(result.final_loss):>8}{value}{mark}")
        return result

    tried: list[Trial] = []
    template = model()
    probe = trial(None)
    result = DoctorResult(probe, tried, steps, monitor=monitor, mode=mode)
    if probe.error is not None and not probe.summaries:
        result.conclusion = f"The run as configured fails before its first step: {probe.error}"
        return result
    if monitor is not None and probe.final_metric is None:
        close = difflib.get_close_matches(monitor, probe.logged_metrics, n=1)
        logged = f" It logs: {', '.join(probe.logged_metrics)}." if probe.logged_metrics else " It logs no metric."
        raise ConfigurationError(
            f"The run never logs {monitor!r} (neither in training nor in a validation pass after it)"
            + (f"; did you mean {close[0]!r}?" if close else ".")
            + logged
        )
    if probe.verdict_class == "healthy":
        result.conclusion = "The run is healthy: nothing to repair (one probe, no change)."
        return result
    traits = ModelTraits.of(template)
    findings = Findings.of(probe.verdict_class, probe.summaries, probe.optimizers)
    second_opinion = False
    fp16 = str(kwargs.get("precision", "")).startswith("16")
    families = plan(findings, traits, declared_variants(template), steps, fp16)
    for family in families:
        best_in_family: Trial | None = None
        for remedy in family:
            if len(tried) >= max_trials:
                break
            outcome = trial(remedy)
            if _overshot(outcome, probe) and len(tried) < max_trials:
                # It cured the failure but the step is now too large for the healthier gradient: the same remedy
                # at a 10x lower learning rate (a deep ReLU net at the LR its sigmoid twin needed).
                outcome = trial(remedy + learning_rate(0.1))
            # Climb a family (a lower LR still) until a step repairs: a 10x lower LR that is still too high can read
            # stalled rather than unstable (stuck after its first blow-up), so a changed failure is no reason to
            # stop. Past the first step that repairs, one step more while it keeps lowering the final loss: the
            # search for the factor (a stalled run's LR 100x up learns, 1000x up may learn what healthy runs do).
            if best_in_family is not None and not _better(outcome, best_in_family, monitor, mode):
                break
            if outcome.works:
                best_in_family = outcome
        if len(tried) >= max_trials:
            break
        if result.best is not None and not try_all:
            # A second opinion: the next family too, so that the table ranks two cures (a clipped IRNN against a
            # re-initialised one) and the better one wins.
            if second_opinion or len(tried) >= max_trials:
                break
            second_opinion = True
    for pair in _combinations(tried, monitor, mode):
        if result.best is not None or len(tried) >= max_trials:
            break
        trial(pair)
    result.conclusion = _conclusion(result, traits, families, max_trials)
    return result


def outcome_of(trial: Trial, monitor: str | None, mode: str = "min") -> tuple[float | None, float]:
    """A trial's outcome, lower is better: its first and its final value of ``monitor`` (negated for ``"max"``), or
    of the training loss; a missing or non-finite final value ranks last (``inf``)."""
    start, final = (trial.start_metric, trial.final_metric) if monitor else (trial.start_loss, trial.final_loss)
    sign = -1.0 if monitor and mode == "max" else 1.0
    ranked = sign * final if final is not None and math.isfinite(final) else math.inf
    return (sign * start if start is not None else None), ranked


def repaired(
    trial: Trial,
    probe: Trial,
    baseline: float | None,
    runs: Sequence[Trial],
    monitor: str | None = None,
    mode: str = "min",
) -> bool:
    """Whether ``trial`` repaired ``probe``'s run (see `doctor`)."""
    remedy = trial.remedy
    tolerated = remedy is not None and trial.verdict_class in remedy.tolerates
    if trial.error is not None or not (trial.verdict_class == "healthy" or tolerated):
        return False
    if monitor is not None:
        # A metric has no floor to measure "learned" against (a loss has 0): better than the probe, and than the
        # trial's own start where training logs it.
        start, final = outcome_of(trial, monitor, mode)
        _, failing = outcome_of(probe, monitor, mode)
        return math.isfinite(final) and final < failing and (start is None or final < start)
    if trial.final_loss is None or probe.final_loss is None:
        return trial.verdict_class == "healthy"  # no single loss (a GAN): the verdict is the outcome
    starts = [r.start_loss for r in [*runs, trial] if r.start_loss is not None and math.isfinite(r.start_loss)]
    trivial = baseline if baseline is not None else min(starts, default=math.inf)
    learned = trial.final_loss < probe.final_loss and trial.final_loss <= LEARNED_FRACTION * trivial
    best = probe.best_loss
    if best is None or not math.isfinite(trivial) or best >= trivial:
        return learned
    # A run that learned before it failed sets a higher bar: the repair keeps at least half the progress the
    # failing run had made at its best (the loss rules' own measure of a blow-up: half the progress given back).
    return learned and trial.final_loss <= best + (trivial - best) / 2


def _better(trial: Trial, than: Trial, monitor: str | None, mode: str) -> bool:
    """``trial`` repaired too, to a better outcome (a lower final loss, or a better monitored metric)."""
    return trial.works and outcome_of(trial, monitor, mode)[1] < outcome_of(than, monitor, mode)[1]


def _overshot(outcome: Trial, probe: Trial) -> bool:
    """A remedy that turned a vanishing, stalled or collapsed run into an exploding or unstable one (and is not a
    learning-rate change itself)."""
    remedy = outcome.remedy
    return (
        remedy is not None
        and probe.verdict_class in ("vanishing", "stalled", "collapse")
        and outcome.verdict_class in ("exploding", "unstable")
        and not any(cls is LearningRateScale for cls, _ in remedy.callbacks)
    )


#: The most combinations of two remedies tried when no single remedy repaired the run (within ``max_trials``).
COMBINATIONS = 2


def _combinations(tried: list[Trial], monitor: str | None = None, mode: str = "min") -> list[Remedy]:
    """Pairs of single remedies of different kinds of change, most promising first, at most `COMBINATIONS`:
    a remedy that cured the verdict without learning (clipping that tamed an RNN's explosion but left it stuck) with
    each other remedy, lowest final loss first (AdamW, which learned while still exploding); then pairs of the
    remedies that brought the final loss lowest."""
    singles = [t for t in tried if t.remedy is not None and " + " not in t.remedy.name and t.error is None]
    singles.sort(key=lambda t: outcome_of(t, monitor, mode)[1])
    cured = [t for t in singles if t.verdict_class == "healthy" or t.verdict_class in _tolerated(t)]
    pairs = [(other, cure) for cure in cured for other in singles if _combinable(other, cure)]
    pairs += [(a, b) for i, a in enumerate(singles) for b in singles[i + 1 :] if _combinable(a, b)]
    combined: list[Remedy] = []
    for first, second in pairs:
        remedy = _remedy(first) + _remedy(second)
        if remedy.name not in {r.name for r in combined}:
            combined.append(remedy)
    return combined[:COMBINATIONS]


def _remedy(trial: Trial) -> Remedy:
    assert trial.remedy is not None
    return trial.remedy


def _tolerated(trial: Trial) -> frozenset[str]:
    return _remedy(trial).tolerates


def _combinable(first: Trial, second: Trial) -> bool:
    """Two remedies of different kinds of change (not two variants, not two steps of one family)."""
    a, b = _remedy(first), _remedy(second)
    return a.callbacks[:1] != b.callbacks[:1] and not (a.variant and b.variant) and _family(a) != _family(b)


def _family(remedy: Remedy) -> str:
    """Remedies of one family differ only in a number ("LR /10", "LR /100")."""
    return remedy.name.split(" ")[0]


def _conclusion(result: DoctorResult, traits: ModelTraits, families: list[list[Remedy]], max_trials: int) -> str:
    best = result.best
    runs = len(result.trials) + 1
    cost = f"{runs} runs of {result.steps} steps, {result.cost:.1f}x the probe's time"
    if best is not None and best.remedy is not None:
        outcome = f"final loss {_loss(best.final_loss)}"
        if result.monitor:
            outcome += f", {result.monitor} {_loss(best.final_metric)} (the probe's {_loss(result.probe.final_metric)})"
        return f"Repaired by {best.remedy.name} ({best.verdict_class}, {outcome}; {cost})."
    if not families:
        return f"No remedy fits a {result.probe.verdict_class} run of this model ({cost})."
    functional = (
        ""
        if traits.saturating or traits.relu_like
        else (
            " The model has no activation modules: if it calls torch.sigmoid/tanh as functions, change them in its"
            " code."
        )
    )
    spent = " (max_trials reached)" if len(result.trials) >= max_trials else ""
    return f"Nothing tried repaired the run{spent} ({cost}).{functional}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
