"""The repair benchmark: ``stabilize doctor`` on every failing case of the pathology zoo and the collection's fragile
models, judged by outcome.

Per case: the probe's verdict (the detected problem), the remedy the doctor chose, the outcome before (the failing
run) and after (the same run with the remedy, measured on held-out data against the *healthy* bar of its case), and
the doctor's cost as a multiple of the probe's time. A case is *repaired* when the remedied run reaches its healthy
bar. Healthy cases must come out untouched: the doctor stops after its probe.

The random baseline: every remedy of the catalogue that applies to the model (see ``catalogue``) is also applied to
every failing case's full run and checked against its healthy bar (``--random``, ~4x longer); a random choice of
``k`` of them, ``k`` the number of trials the doctor spent on the case, repairs with probability
``1 - C(n - g, k) / C(n, k)`` (``g`` of the ``n`` reach the bar), granting the random strategy an oracle that
recognises the one that worked. Exact, so the baseline's rate has no sampling noise.

    python benchmarks/repair_bench.py                  # every case, ~30 minutes on 2 cores (25 in the doctor)
    python benchmarks/repair_bench.py --random         # also the random baseline, ~50 minutes
    python benchmarks/repair_bench.py --smoke          # two cases, one healthy (the test runs this)
    python benchmarks/repair_bench.py --cases minimax-gan --random --update benchmarks/results/repair_bench.json

Writes ``benchmarks/results/repair_bench.json`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader

from stabilize.doctor import Remedy, declared_variants, doctor
from stabilize.doctor.remedies import (
    activation_swap,
    clipping,
    learning_rate,
    optimizer_swap,
    reinitialisation,
    variant,
    warmup,
)
from stabilize.errors import StabilizeError

try:  # run as a script, benchmarks/ is on the path; imported by the tests, the package
    import pathology_zoo as zoo
    import repair_cases
except ImportError:
    from benchmarks import pathology_zoo as zoo
    from benchmarks import repair_cases

SMOKE_CASES = ("mlp-adam", "big-init")


@dataclass(frozen=True)
class RepairCase:
    """A zoo case and the healthy bar its repaired run must reach (None: a healthy case, which must be left alone)."""

    case: zoo.Case
    healthy_bar: Callable[[LightningModule], tuple[bool, str]] | None
    #: The metric the doctor judges trials by and its mode (None: the training loss).
    monitor: tuple[str, str] | None = None


def loader(case: zoo.Case, seed: int) -> Callable[[], DataLoader | LightningDataModule]:
    def make() -> DataLoader | LightningDataModule:
        data = case.data()
        if isinstance(data, LightningDataModule):
            return data
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=case.batch_size, shuffle=True, drop_last=True, generator=generator)

    return make


def train_with(case: zoo.Case, remedy: Remedy | None, seed: int) -> LightningModule:
    """The case's full run with ``remedy`` applied, for its outcome on held-out data."""
    seed_everything(seed, verbose=False)
    template = case.module()
    seed_everything(seed, verbose=False)
    module = remedy.variant.build(template) if remedy is not None and remedy.variant else case.module()
    trainer = Trainer(
        max_steps=case.steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=remedy.make_callbacks() if remedy is not None else [],
    )
    source = loader(case, seed)()
    with warnings.catch_warnings(), contextlib.suppress(StabilizeError):  # a diverged run: its outcome says so
        warnings.simplefilter("ignore")
        if isinstance(source, LightningDataModule):
            trainer.fit(module, datamodule=source)
        else:
            trainer.fit(module, train_dataloaders=source)
    return module


def catalogue(module: LightningModule, steps: int) -> list[Remedy]:
    """Every single remedy the doctor knows that applies to ``module``, whatever the finding (the random
    baseline's choices)."""
    declared = declared_variants(module)
    return [
        learning_rate(0.1),
        learning_rate(0.01),
        learning_rate(10.0),
        warmup(max(10, steps // 5)),
        clipping(),
        reinitialisation(),
        activation_swap("relu", "he"),
        activation_swap("selu", "lecun"),
        *([optimizer_swap()] if uses_sgd(module) and "adamw" not in declared else []),
        *(variant(kind, declared) for kind in declared),
    ]


def uses_sgd(module: LightningModule) -> bool:
    """Whether ``module`` configures SGD (the doctor offers AdamW instead to such runs only)."""
    try:
        configured = module.configure_optimizers()
    except Exception:  # a module that needs its Trainer to configure: not SGD as far as the baseline knows
        return False
    found = configured if isinstance(configured, (list, tuple)) else [configured]
    optimizers = [c.get("optimizer") if isinstance(c, dict) else c for c in found]
    return any(isinstance(o, torch.optim.SGD) for o in optimizers)


def random_rate(repairing: int, remedies: int, draws: int) -> float:
    """The chance that ``draws`` remedies drawn without replacement from ``remedies`` include one of ``repairing``."""
    if draws <= 0:
        return 0.0
    if draws >= remedies:
        return float(repairing > 0)
    return 1.0 - math.comb(remedies - repairing, draws) / math.comb(remedies, draws)


def run(repair_case: RepairCase, seed: int, with_random: bool) -> dict[str, Any]:
    case = repair_case.case
    start = time.perf_counter()
    monitor, mode = repair_case.monitor or (None, "min")
    result = doctor(case.module, loader(case, seed), steps=case.steps, seed=seed, monitor=monitor, mode=mode)
    seconds = time.perf_counter() - start
    best = result.best
    row: dict[str, Any] = {
        "name": case.name,
        "label": case.label,
        "detected": result.probe.verdict_class,
        "probe_verdict": result.probe.verdict,
        "trials": [
            {
                "remedy": t.name,
                "verdict": t.verdict_class,
                "final_loss": t.final_loss,
                **({"final_metric": t.final_metric} if monitor else {}),
                "works": t.works,
            }
            for t in result.trials
        ],
        "remedy": best.name if best is not None else None,
        "cost": round(result.cost, 2),
        "runs": len(result.trials) + 1,
        "seconds": round(seconds, 1),
        "conclusion": result.conclusion,
    }
    if repair_case.healthy_bar is None:
        row["untouched"] = result.healthy and not result.trials
        return row
    _, before = case.outcome(train_with(case, None, seed))
    row["before"] = before
    if best is not None:
        row["repaired"], row["after"] = repair_case.healthy_bar(train_with(case, best.remedy, seed))
    else:
        row["repaired"], row["after"] = False, "no remedy chosen"
    if with_random and not result.healthy:
        # Every remedy of the catalogue judged as the doctor's choice is: the full run, against the healthy bar.
        choices = catalogue(case.module(), case.steps)
        works = [bool(repair_case.healthy_bar(train_with(case, remedy, seed))[0]) for remedy in choices]
        row["random"] = {
            "remedies": len(choices),
            "repairing": sum(works),
            "repairing_names": [r.name for r, w in zip(choices, works) if w],
            "rate_at_same_budget": random_rate(sum(works), len(choices), len(result.trials)),
        }
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if "untouched" in r:
            print(f"{r['name']:<30} healthy -> {'untouched' if r['untouched'] else 'CHANGED'} ({r['cost']:.1f}x)")
            continue
        mark = "repaired" if r["repaired"] else "NOT REPAIRED"
        print(f"{r['name']:<30} {r['detected']:<9} -> {r['remedy']!s:<24} {mark:<12} {r['cost']:4.1f}x")
        print(f"{'':<30} before: {r['before']}")
        print(f"{'':<30} after:  {r['after']}")
        if "random" in r:
            print(f"{'':<30} random at the same budget: {r['random']['rate_at_same_budget']:.0%}")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The failing cases as a Markdown table (the docs' table), then one line for the healthy ones."""
    lines = [
        "| case | detected | remedy chosen | before | after (healthy bar) | repaired | runs | time"
        " | random, same budget |",
        "|---|---|---|---|---|:-:|---:|---:|---:|",
    ]
    for r in rows:
        if "untouched" in r:
            continue
        random = f"{r['random']['rate_at_same_budget']:.0%}" if "random" in r else "-"
        mark = "yes" if r["repaired"] else "no"
        lines.append(
            f"| {r['name']} | {r['detected']} | {r['remedy'] or '-'} | {_outcome(r['before'])}"
            f" | {_outcome(r['after'])} | {mark} | {r['runs']} | {r['cost']:.1f}x | {random} |"
        )
    healthy = [r for r in rows if "untouched" in r]
    untouched = sum(r["untouched"] for r in healthy)
    lines.append(f"\nHealthy cases: {untouched} of {len(healthy)} untouched (one probe each, no trial).")
    return "\n".join(lines)


def _outcome(words: str) -> str:
    """``held-out accuracy 34.3% (failing needs ...)`` -> ``held-out accuracy 34.3%``, bar kept for the after."""
    head, _, bar = words.partition(" (")
    needs = [part for part in bar.rstrip(")").split("; ") if "needs" in part]
    return f"{head} ({needs[0]})" if needs and "healthy" in needs[0] else head


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    failing = [r for r in rows if "repaired" in r]
    # A bar some single remedy of the catalogue reaches in the case's budget (measured by --random).
    reachable = [r for r in failing if r.get("random", {}).get("repairing", 0) > 0]
    healthy = [r for r in rows if "untouched" in r]
    randoms = [r["random"]["rate_at_same_budget"] for r in failing if "random" in r]
    return {
        "failing_cases": len(failing),
        "repaired": sum(r["repaired"] for r in failing),
        "repair_rate": sum(r["repaired"] for r in failing) / max(len(failing), 1),
        "reachable_cases": len(reachable) if randoms else None,
        "repair_rate_reachable": sum(r["repaired"] for r in reachable) / max(len(reachable), 1) if randoms else None,
        "random_repair_rate": sum(randoms) / len(randoms) if randoms else None,
        # The cost in probe budgets: every trial runs the probe's steps, so runs are the exact multiple; the time
        # ratio also carries the machine's noise (another job on the cores during the probe or a trial).
        "mean_runs_failing": sum(r["runs"] for r in failing) / max(len(failing), 1),
        "mean_runs_all": sum(r["runs"] for r in rows) / max(len(rows), 1),
        "mean_cost_failing": sum(r["cost"] for r in failing) / max(len(failing), 1),
        "mean_cost_all": sum(r["cost"] for r in rows) / max(len(rows), 1),
        "healthy_cases": len(healthy),
        "healthy_changed": sum(not r["untouched"] for r in healthy),
    }


def cases() -> list[RepairCase]:
    bars = repair_cases.healthy_bars()
    chosen = []
    for case in [*zoo.cases(), *repair_cases.collection_cases()]:
        monitor = repair_cases.MONITORS.get(case.name)
        chosen.append(RepairCase(case, None if case.label == "healthy" else bars[case.name], monitor))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="names of the cases to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help=f"run {', '.join(SMOKE_CASES)} only")
    parser.add_argument("--random", action="store_true", help="also try every remedy: the random baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/...)")
    parser.add_argument("--table", type=Path, default=None, help="print a saved JSON's Markdown table and stop")
    parser.add_argument(
        "--update",
        type=Path,
        default=None,
        help="rerun --cases and replace their rows in this saved JSON (totals recomputed, the cases listed under"
        " 'updated'): after a fix that touches only those cases",
    )
    args = parser.parse_args()
    if args.table is not None:
        rows = json.loads(args.table.read_text())["cases"]
        print(markdown(rows))
        print(json.dumps(summary(rows), indent=1))
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    every = cases()
    wanted = SMOKE_CASES if args.smoke else args.cases
    if wanted:
        unknown = set(wanted) - {c.case.name for c in every}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; known: {[c.case.name for c in every]}")
        every = [c for c in every if c.case.name in wanted]
    missing = [c for c in every if c.case.needs and importlib.util.find_spec(c.case.needs) is None]
    if missing:
        print(f"skipped {len(missing)} case(s) whose library is not installed: pip install -e '.[zoo]'")
        every = [c for c in every if c not in missing]
    rows = []
    for repair_case in every:
        rows.append(run(repair_case, args.seed, args.random))
        print_table(rows[-1:])
    totals = summary(rows)
    print(json.dumps(totals, indent=1))
    if args.update is not None:
        saved = json.loads(args.update.read_text())
        fresh = {row["name"]: row for row in rows}
        merged = [fresh.pop(row["name"], row) for row in saved["cases"]] + list(fresh.values())
        updated = sorted({*saved.get("updated", []), *(row["name"] for row in rows)})
        flags = " --random" if args.random else ""
        payload = {
            **saved,
            **summary(merged),
            "updated": updated,
            "update_command": f"python benchmarks/repair_bench.py --cases {' '.join(wanted or [])}{flags} --update",
            "cases": merged,
        }
        args.update.write_text(json.dumps(payload, indent=1))
        print(json.dumps(summary(merged), indent=1))
        return
    out = args.out or (None if wanted else Path(__file__).parent / "results" / "repair_bench.json")
    if out is not None:
        payload = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
            "command": "python benchmarks/repair_bench.py" + (" --random" if args.random else ""),
            "skipped": [c.case.name for c in missing],
            **totals,
            "cases": rows,
        }
        out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()


__all__ = ["RepairCase", "cases", "catalogue", "random_rate", "replace"]
