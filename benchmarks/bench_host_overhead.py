"""Host overhead per training step: a raw PyTorch loop, Lightning's floor, and the project's modules, at sizes where
the arithmetic is negligible, so that what is measured is the Python each step runs.

For each model family, three configurations train the same network on the same in-memory batches (one thread):

- ``raw``: a plain PyTorch loop (forward, loss, ``zero_grad``, ``backward``, ``step``);
- ``lightning``: a minimal LightningModule around the same network (``training_step`` returns the loss, the same
  optimizer), under a Trainer with a TensorBoard logger, no progress bar, no checkpointing: Lightning's own floor;
- ``project``: the project's module (``FastCNN``, ``RecurrentNet``, ``DCGAN``) with ``GradientHealthCallback`` at
  its defaults, under the same Trainer;
- ``module`` and ``callback``: the two halves of ``project`` alone (the project's module without the callback; the
  floor's module with it), to say which half costs what.

The families: ``image`` (FastCNN widths 8/8/8, batch 16, 12x12 images; ImageClassifier's logging, metrics and
checks), ``recurrent`` (RecurrentNet, a tanh RNN of 16 units on the adding problem with T = 20, batch 16) and
``gan`` (DCGAN with 8 generator and discriminator filters, latent 16, batch 16; manual optimization, two
optimizers per batch).

A step's time is the interval between two consecutive batch starts, so it holds all of the loop's work (Lightning's
hooks, logging, the optimizer); the first ``--warmup`` steps of each run are left out. Rounds interleave every
configuration of every family, in an order that rotates from round to round, so the drift of this shared machine's
speed hits all of them alike. Reported per family and configuration: the median step of a run (the median over
rounds) and its mean (which includes the logging steps, every 50th), in ms; the difference to Lightning's floor,
paired within each round and then the median over rounds, with a 90% bootstrap interval of that median and the
smallest and largest difference over the rounds; the ratio to the raw loop; and the lowest median
over the rounds with its difference to the floor's lowest (interference only adds time: the closest to an
undisturbed step).

    python benchmarks/bench_host_overhead.py                  # CPU, ~12 minutes on 2 cores
    python benchmarks/bench_host_overhead.py --device cuda    # the same on a GPU (data on the device)
    python benchmarks/bench_host_overhead.py --smoke          # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from stabilize.callbacks import GradientHealthCallback
from stabilize.models import DCGAN, FastCNN, RecurrentNet
from stabilize.models.gan_networks import discriminator_loss, generator_loss

CONFIGURATIONS = ("raw", "lightning", "module", "callback", "project")

#: ``wall``: elapsed time; ``cpu``: the CPU time of the training thread (``time.thread_time``), which leaves out the
#: time this thread waits while other processes or the hypervisor hold the core: on a shared VM the steadier measure
#: of the Python a step runs (on one CPU thread all of a step's work, autograd included, runs on that thread; the
#: TensorBoard writer's thread is not counted, in any configuration). A GPU step needs ``wall``.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


class BatchClock(Callback):
    """Notes the time at the start of every training batch."""

    def __init__(self, sync: Callable[[], None], now: Callable[[], float]) -> None:
        self.starts: list[float] = []
        self._sync = sync
        self._now = now

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync()
        self.starts.append(self._now())


class Batches(torch.utils.data.IterableDataset):
    """The same prepared batches, in the same order, for every configuration."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


# ------------------------------------------------------------------------------------------------ the families
@dataclass
class Family:
    """One model family: its project module, the loss of its network in a raw loop and its data."""

    name: str
    project: Callable[[], LightningModule]
    #: The network and the loss of one batch in a raw loop; ``None`` for the GAN, whose loop has two optimizers.
    loss: Callable[[nn.Module, Any], Tensor] | None
    make_batch: Callable[[torch.Generator], Any]


def image_project() -> LightningModule:
    return FastCNN(widths=(8, 8, 8))


def recurrent_project() -> LightningModule:
    return RecurrentNet(input_size=2, hidden_size=16)


def gan_project() -> LightningModule:
    return DCGAN(latent_dim=16, ngf=8, ndf=8)


def image_loss(network: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(network(batch[0]), batch[1])


def recurrent_loss(network: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    outputs, _ = network(batch[0])
    return F.mse_loss(outputs[:, -1].squeeze(-1), batch[1])


def image_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(16, 3, 12, 12, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def adding_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    values = torch.rand(16, 20, generator=generator)
    markers = torch.zeros(16, 20)
    markers[:, :2] = 1.0
    return torch.stack([values, markers], -1), (values * markers).sum(1)


def gan_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.rand(16, 3, 32, 32, generator=generator), torch.zeros(16, dtype=torch.long)  # DCGAN's size


FAMILIES = {
    "image": Family("image", image_project, image_loss, image_batch),
    "recurrent": Family("recurrent", recurrent_project, recurrent_loss, adding_batch),
    "gan": Family("gan", gan_project, None, gan_batch),
}


def raw_parts(family: Family) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    """The project module's networks and optimizers, taken out of it for the raw loop and the floor."""
    module = family.project()
    if isinstance(module, DCGAN):
        generator, discriminator = module.generator, module.discriminator
        return [generator, discriminator], [
            torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        ]
    network = module.network
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if isinstance(module, RecurrentNet):
        optimizer = torch.optim.Adam(trainable, lr=1e-3)
    else:
        optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, nesterov=True)
    return [network], [optimizer]


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizers: list[Any],
    real: Tensor,
    backward: Callable[[Tensor], None],
) -> None:
    """One discriminator and one generator step, as DCGAN takes them (non-saturating loss)."""
    g_opt, d_opt = optimizers
    real = real * 2 - 1
    noise = torch.randn(len(real), 16, device=real.device)
    fake = generator(noise)
    d_loss = discriminator_loss("non_saturating", discriminator(real), discriminator(fake.detach()))
    d_opt.zero_grad(set_to_none=True)
    backward(d_loss)
    d_opt.step()
    g_loss = generator_loss("non_saturating", discriminator(generator(torch.randn(len(real), 16, device=real.device))))
    g_opt.zero_grad(set_to_none=True)
    backward(g_loss)
    g_opt.step()


class FloorModule(LightningModule):
    """Lightning's floor: the same networks and optimizers, nothing else."""

    def __init__(self, family: Family) -> None:
        super().__init__()
        networks, self._optimizers = raw_parts(family)
        self.networks = nn.ModuleList(networks)
        self.loss = family.loss
        self.automatic_optimization = family.loss is not None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.loss is not None:
            return self.loss(self.networks[0], batch)
        gan_step(self.networks[0], self.networks[1], list(self.optimizers()), batch[0], self.manual_backward)
        return None

    def configure_optimizers(self) -> Any:
        return self._optimizers


# ------------------------------------------------------------------------------------------------------ runs
def run_raw(
    family: Family, batches: list[Any], sync: Callable[[], None], now: Callable[[], float], device: torch.device
) -> list[float]:
    seed_everything(0, verbose=False)
    networks, optimizers = raw_parts(family)
    for network in networks:
        network.to(device).train()
    starts = []
    for batch in batches:
        sync()
        starts.append(now())
        if family.loss is None:
            gan_step(networks[0], networks[1], optimizers, batch[0], Tensor.backward)
        else:
            loss = family.loss(networks[0], batch)
            optimizers[0].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[0].step()
    return starts


def run_lightning(
    family: Family,
    configuration: str,
    batches: list[Any],
    sync: Callable[[], None],
    now: Callable[[], float],
    device: torch.device,
    logs: str,
) -> list[float]:
    seed_everything(0, verbose=False)
    module = FloorModule(family) if configuration in ("lightning", "callback") else family.project()
    clock = BatchClock(sync, now)
    callbacks: list[Callback] = [clock]
    if configuration in ("project", "callback"):
        callbacks.append(GradientHealthCallback(verbose=False))
    trainer = Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        limit_train_batches=len(batches),
        logger=TensorBoardLogger(logs, name=f"{family.name}-{configuration}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    loader = torch.utils.data.DataLoader(Batches(batches), batch_size=None)
    trainer.fit(module, loader)
    return clock.starts


def step_times(starts: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in itertools.pairwise(starts)][warmup:]


def bootstrap_ci(differences: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 90% interval of the median of ``differences`` (ms), by resampling the rounds with replacement (seeded): how far
    the paired median can be trusted on a machine whose rounds swing by a millisecond."""
    chance = random.Random(0)
    medians = sorted(statistics.median(chance.choices(differences, k=len(differences))) for _ in range(resamples))
    return 1e3 * medians[int(0.05 * resamples)], 1e3 * medians[int(0.95 * resamples) - 1]


def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    now = CLOCKS[args.clock]
    generator = torch.Generator().manual_seed(0)
    families = [FAMILIES[name] for name in args.families]
    data = {f.name: [tuple(t.to(device) for t in f.make_batch(generator)) for _ in range(args.steps)] for f in families}
    runs: dict[tuple[str, str], list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as logs:
        for round_index in range(args.rounds):
            # Each round starts the cycle of configurations one further, so none always runs after the same one.
            shift = round_index % len(CONFIGURATIONS)
            for family in families:
                for configuration in CONFIGURATIONS[shift:] + CONFIGURATIONS[:shift]:
                    batches = data[family.name]
                    # As timeit does: no garbage collection while a run is timed (the previous run's is done now).
                    gc.collect()
                    gc.disable()
                    try:
                        if configuration == "raw":
                            starts = run_raw(family, batches, sync, now, device)
                        else:
                            starts = run_lightning(family, configuration, batches, sync, now, device, logs)
                    finally:
                        gc.enable()
                    runs.setdefault((family.name, configuration), []).append(step_times(starts, args.warmup))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for family in families:
        medians = {c: [statistics.median(t) for t in runs[(family.name, c)]] for c in CONFIGURATIONS}
        means = {c: [statistics.fmean(t) for t in runs[(family.name, c)]] for c in CONFIGURATIONS}
        rows: dict[str, dict[str, float]] = {}
        for configuration in CONFIGURATIONS:
            # Differences to the floor are paired within a round (the runs closest in time), then the median over
            # rounds: the machine's drift between rounds cancels; the spread over rounds says how far to trust it.
            above = [a - b for a, b in zip(medians[configuration], medians["lightning"])]
            mean_above = [a - b for a, b in zip(means[configuration], means["lightning"])]
            rows[configuration] = {
                # Interference from other processes only ever adds time, so the lowest median over the rounds is
                # the closest to the undisturbed step (timeit's advice: the minimum, not the mean).
                "lowest_median_ms": 1e3 * min(medians[configuration]),
                "lowest_above_lightning_ms": 1e3 * (min(medians[configuration]) - min(medians["lightning"])),
                "median_ms": 1e3 * statistics.median(medians[configuration]),
                "mean_ms": 1e3 * statistics.median(means[configuration]),
                "median_above_lightning_ms": 1e3 * statistics.median(above),
                "median_above_lightning_min_ms": 1e3 * min(above),
                "median_above_lightning_max_ms": 1e3 * max(above),
                **dict(zip(("median_above_lightning_ci5_ms", "median_above_lightning_ci95_ms"), bootstrap_ci(above))),
                "mean_above_lightning_ms": 1e3 * statistics.median(mean_above),
                "median_ratio_to_raw": statistics.median(a / b for a, b in zip(medians[configuration], medians["raw"])),
                "steps": sum(len(t) for t in runs[(family.name, configuration)]),
            }
        results[family.name] = {c: {k: round(v, 4) for k, v in row.items()} for c, row in rows.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="first steps of each run left out")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="what a step's time is (see CLOCKS)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 12 steps: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.warmup = 2, 12, 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = measure(args)
    print(
        f"host overhead per training step ({args.clock} clock), {args.device}, 1 thread, {args.rounds} interleaved"
        f" rounds x {args.steps}"
        f" steps (first {args.warmup} left out), torch {torch.__version__}"
    )
    print(
        f"{'family':<10} {'configuration':<13} {'median ms':>9} {'above floor':>11} {'(90% interval)':>17}"
        f" {'(rounds: min, max)':>19}"
        f" {'x raw':>6} {'mean ms':>8} {'mean above':>10} {'lowest ms':>9} {'lowest above':>12}"
    )
    for family, rows in results.items():
        for configuration, row in rows.items():
            spread = f"({row['median_above_lightning_min_ms']:+.3f}, {row['median_above_lightning_max_ms']:+.3f})"
            interval = f"({row['median_above_lightning_ci5_ms']:+.3f}, {row['median_above_lightning_ci95_ms']:+.3f})"
            print(
                f"{family:<10} {configuration:<13} {row['median_ms']:9.3f} {row['median_above_lightning_ms']:+11.3f}"
                f" {interval:>17} {spread:>19} {row['median_ratio_to_raw']:6.3f} {row['mean_ms']:8.3f}"
                f" {row['mean_above_lightning_ms']:+10.3f} {row['lowest_median_ms']:9.3f}"
                f" {row['lowest_above_lightning_ms']:+12.3f}"
            )
    figures = {
        "device": args.device,
        "clock": args.clock,
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        **results,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
