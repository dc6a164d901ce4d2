"""Cost of GradientHealthCallback: training-step time of ResNet-20 with and without it, in one process.

Four configurations train the same ResNet-20 (same initial weights, same in-memory random batches of 128
CIFAR-sized images, SGD) under Lightning's Trainer:

- ``baseline``: no gradient monitoring;
- ``gradient_health``: ``GradientHealthCallback()`` at its defaults (detailed record every ``log_every_n_steps``,
  the device-side cheap check on the other steps);
- ``gradient_health_every_step``: the same with ``log_every_n_steps=1`` (histograms every 10 steps and the flow
  figure every 20, their default multiples of the logging interval, but at most every 10 s and 60 s of wall time);
- ``gradient_health_every_step_ungated``: the same without the wall-time limits, so that histograms and figures
  really are drawn every 10 and 20 steps: its self-time by kind of step shows what each costs;
- ``lightning_grad_norm`` (the anchor): Lightning's ``grad_norm`` utility plus ``log_dict`` on every step, the
  usual way to watch gradient norms in Lightning;
- ``sharpness_every_100``: ``SharpnessMonitor(every_n_steps=100)`` at its defaults (the whole batch of 128, Lanczos
  to a residual bound of 1%); ``..._64_examples`` and ``..._32_examples``: on that many of the batch's examples;
  ``..._tolerance_1e-3``: the whole batch to 0.1%. For each: the first measurement (cold, from a random vector) and
  the second (warm-started from the first's eigenvector) in ms and in baseline steps, and what measuring every 100
  steps costs a long run (``--configs`` picks configurations).

Each round runs every configuration once (``--steps`` optimizer steps each), interleaved, so drifts of this
machine's speed hit all of them alike. A step's time is measured from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward, hooks, optimizer step). Reported: the median step time per configuration
and its ratio to the baseline, the mean over all steps (which includes the detailed logging steps), and the time
spent inside the monitor's own hooks per step as a fraction of the baseline step: end-to-end ratios on a shared
2-core machine drift by several percent between runs, the hooks' self-time does not. The self-time is also split
by kind of step in the ungated configuration: a logging step, a logging step that writes the histograms, and one
that also draws the flow figure (medians over the steps of each kind). The fit's last step draws the final flow
figure and histograms whatever the cadence, once per fit: its self-time is reported on its own (``last step hook
ms``), not spread over the steps of these short runs.

    python benchmarks/bench_callback_overhead.py                 # CPU, ~12 minutes on 2 cores
    python benchmarks/bench_callback_overhead.py --smoke         # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm

from stabilize.callbacks import GradientHealthCallback, SharpnessMonitor
from stabilize.models import ResNet


class StepTimer(Callback):
    """Times each training step; ``spent`` collects the monitors' self-time per step index."""

    def __init__(self, spent: dict[int, float] | None = None) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self.spent = spent if spent is not None else {}

    def _sync(self, module: LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


class LightningGradNorm(Callback):
    """The anchor: Lightning's documented recipe, ``grad_norm`` + ``log_dict`` in ``on_before_optimizer_step``."""

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


SELF_TIMED_HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "_on_optimizer_stepped")


def self_timed(callback: Callback, timer: StepTimer) -> Callback:
    """Wrap the callback's per-step hooks so the time spent inside them adds up in ``timer.spent[step]``.

    This self-time is the monitor's own cost, nearly immune to the drift of the machine that blurs end-to-end step
    times; it misses work a callback leaves to others (e.g. Lightning logging what ``log_dict`` collected).
    """
    for name in SELF_TIMED_HOOKS:
        hook = getattr(callback, name, None)
        if hook is None:
            continue

        def timed(*args: Any, _hook: Any = hook, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                step = len(timer.times)
                timer.spent[step] = timer.spent.get(step, 0.0) + time.perf_counter() - start

        setattr(callback, name, timed)
    return callback


class RandomBatches(torch.utils.data.IterableDataset):
    def __init__(self, batch_size: int, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [
            (
                torch.randn(batch_size, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (batch_size,), generator=generator),
            )
            for _ in range(count)
        ]

    def __iter__(self):
        return iter(self.batches)


#: With log_every_n_steps=1 the defaults put histograms on every 10th step and the figure on every 20th.
STEP_KINDS = ("logging step", "logging + histograms", "logging + histograms + figure")


def step_kind(step: int) -> str:
    return STEP_KINDS[2] if step % 20 == 0 else STEP_KINDS[1] if step % 10 == 0 else STEP_KINDS[0]


CONFIGS = {
    "baseline": list,
    "gradient_health": lambda: [GradientHealthCallback(verbose=False)],
    "gradient_health_every_step": lambda: [GradientHealthCallback(log_every_n_steps=1, verbose=False)],
    "gradient_health_every_step_ungated": lambda: [
        GradientHealthCallback(log_every_n_steps=1, histogram_min_interval_s=0, figure_min_interval_s=0, verbose=False)
    ],
    "lightning_grad_norm": lambda: [LightningGradNorm()],
    # SharpnessMonitor measures at steps 0 (cold: a random start vector) and 100 (warm-started from step 0's
    # eigenvector); its cost is those two measurements, reported on their own below.
    "sharpness_every_100": lambda: [SharpnessMonitor(every_n_steps=100, verbose=False)],
    "sharpness_every_100_64_examples": lambda: [SharpnessMonitor(every_n_steps=100, examples=64, verbose=False)],
    "sharpness_every_100_32_examples": lambda: [SharpnessMonitor(every_n_steps=100, examples=32, verbose=False)],
    "sharpness_every_100_tolerance_1e-3": lambda: [SharpnessMonitor(every_n_steps=100, tolerance=1e-3, verbose=False)],
}
SHARPNESS_CONFIGS = (
    "sharpness_every_100",
    "sharpness_every_100_64_examples",
    "sharpness_every_100_32_examples",
    "sharpness_every_100_tolerance_1e-3",
)


def run_once(
    name: str, args: argparse.Namespace, batches: RandomBatches, log_dir: str
) -> tuple[list[float], dict[int, float]]:
    """Step times of one run (warm-up steps left out) and the seconds spent inside the monitor's hooks per step."""
    seed_everything(0, verbose=False)
    model = ResNet(depth=args.depth, scheduler="constant", lr=0.05)
    timer = StepTimer()
    monitors = [self_timed(callback, timer) for callback in CONFIGS[name]()]
    trainer = Trainer(
        max_steps=args.steps,
        accelerator=args.accelerator,
        devices=1,
        logger=TensorBoardLogger(log_dir, name=name),
        callbacks=[timer, *monitors],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=args.log_every_n_steps,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(model, loader)
    return timer.times[args.warmup :], timer.spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=101, help="steps per run (101: logging steps 0, 50 and 100)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each run left out")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--log-every-n-steps", type=int, default=50, help="the Trainer's default")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="only these (baseline is always run)")
    args = parser.parse_args()
    names = ["baseline", *(c for c in args.configs or CONFIGS if c != "baseline")]
    if args.smoke:
        args.rounds, args.steps, args.batch_size, args.depth, args.log_every_n_steps = 1, 4, 8, 8, 2
    warnings.filterwarnings("ignore")
    batches = RandomBatches(args.batch_size, args.steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    self_time = dict.fromkeys(names, 0.0)
    final_record: dict[str, list[float]] = {name: [] for name in names}
    # SharpnessMonitor's measurements at steps 0 and 100 (in on_train_batch_end, after StepTimer counted the step:
    # self-time index step + 1).
    measurements: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    by_kind: dict[str, list[float]] = {kind: [] for kind in STEP_KINDS}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            for name in names:
                step_times, spent = run_once(name, args, batches, log_dir)
                measurements[name].append((spent.get(1, 0.0), spent.get(args.steps, 0.0)))
                times[name] += step_times
                # The fit's last step draws the final figure and histograms whatever the cadence: a cost per fit,
                # reported on its own rather than spread over this benchmark's short runs.
                last = args.steps - 1
                self_time[name] += sum(t for step, t in spent.items() if args.warmup <= step < last)
                final_record[name].append(spent.get(last, 0.0))
                if name == "gradient_health_every_step_ungated":
                    for step, seconds in spent.items():
                        if args.warmup <= step < last:
                            by_kind[step_kind(step)].append(seconds)
    total_steps = args.rounds * (args.steps - 1 - args.warmup)
    base_median, base_mean = statistics.median(times["baseline"]), statistics.mean(times["baseline"])
    print(
        f"ResNet-{args.depth}, batch {args.batch_size}, {args.accelerator}, {torch.get_num_threads()} threads,"
        f" {args.rounds} rounds x {args.steps} steps, log_every_n_steps={args.log_every_n_steps}"
    )
    print(
        f"{'configuration':>26} {'median step ms':>15} {'ratio':>7} {'mean step ms':>13} {'ratio':>7}"
        f" {'hook ms/step':>13} {'of baseline step':>17} {'last step hook ms':>18}"
    )
    results = {}
    for name, values in times.items():
        median, mean = statistics.median(values), statistics.mean(values)
        hook_ms = self_time[name] / total_steps * 1e3
        results[name] = {
            "median_ms": round(median * 1e3, 2),
            "median_ratio": round(median / base_median, 4),
            "mean_ms": round(mean * 1e3, 2),
            "mean_ratio": round(mean / base_mean, 4),
            "hook_ms_per_step": round(hook_ms, 3),
            "hook_fraction_of_baseline_step": round(hook_ms / (base_median * 1e3), 5),
            "final_step_hook_ms": round(statistics.median(final_record[name]) * 1e3, 2),
            "steps": len(values),
        }
        print(
            f"{name:>26} {median * 1e3:>15.1f} {median / base_median:>6.3f}x {mean * 1e3:>13.1f}"
            f" {mean / base_mean:>6.3f}x {hook_ms:>13.2f} {100 * hook_ms / (base_median * 1e3):>16.2f}%"
            f" {results[name]['final_step_hook_ms']:>18.1f}"
        )
    print(f"gradient_health_every_step_ungated self-time by kind of step ({base_median * 1e3:.1f} ms baseline step):")
    for kind, values in by_kind.items():
        if values:
            median = statistics.median(values) * 1e3
            results[f"every_step_{kind}"] = {"self_ms": round(median, 2), "steps": len(values)}
            share = median / (base_median * 1e3)
            print(f"{kind:>30} {median:>9.2f} ms  {share:>7.2%} of a step  ({len(values)} steps)")
    measured = [name for name in SHARPNESS_CONFIGS if name in names]
    if measured:
        every = 100
        print(f"SharpnessMonitor, one measurement ({base_median * 1e3:.1f} ms baseline step):")
        for name in measured:
            cold = statistics.median(first for first, _ in measurements[name]) * 1e3
            warm = statistics.median(second for _, second in measurements[name]) * 1e3
            # A long run measures warm-started every `every` steps: that cost spread over the steps between.
            ratio = 1 + warm / (every * base_median * 1e3)
            results[f"{name}_measurement"] = {"cold_ms": round(cold, 1), "warm_ms": round(warm, 1), "ratio": ratio}
            print(
                f"{name:>34}  first (cold) {cold:>8.0f} ms = {cold / (base_median * 1e3):5.1f} steps;"
                f" warm {warm:>8.0f} ms = {warm / (base_median * 1e3):5.1f} steps: every {every} steps"
                f" {ratio:.3f}x training time"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
