"""The benchmark scripts run (in --smoke mode: tiny data, seconds) and print what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_smoke(script: str, tmp_path: Path, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # A guard against a hang, not a speed check: a loaded 2-core machine ran the zoo's smoke cases 300 s.
        timeout=1200,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_bench_datamodule(tmp_path: Path) -> None:
    lines = run_smoke("bench_datamodule.py", tmp_path)
    figures, paths = json.loads(lines[-3]), json.loads(lines[-1])
    assert figures["ours_images_per_s"] > 0 and figures["baseline_images_per_s"] > 0
    # The benchmark prints the ratio rounded to one decimal: it is off the ratio of the printed rates by <= 0.05.
    assert figures["ratio"] == pytest.approx(figures["ours_images_per_s"] / figures["baseline_images_per_s"], abs=0.051)
    assert set(paths["augmentation_only"]) == {"integer_shift_fast_path", "resampling_matrices"}


def test_bench_callback_overhead(tmp_path: Path) -> None:
    figures = json.loads(run_smoke("bench_callback_overhead.py", tmp_path)[-1])
    configurations = {
        "baseline",
        "gradient_health",
        "gradient_health_every_step",
        "gradient_health_every_step_ungated",
        "lightning_grad_norm",
    }
    assert configurations <= set(figures)
    assert figures["baseline"]["median_ratio"] == 1.0
    assert figures["every_step_logging step"]["self_ms"] > 0
    # The smoke run stops before step 100: only the cold measurement at step 0 happens.
    sharpness = figures["sharpness_every_100_measurement"]
    assert sharpness["cold_ms"] > 0 and sharpness["warm_ms"] == 0 and sharpness["ratio"] >= 1.0


def test_the_edge_of_stability_example(tmp_path: Path) -> None:
    script = BENCHMARKS.parent / "examples" / "edge_of_stability.py"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--lrs", "0.05", "0.1", "--out", str(tmp_path / "eos")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # a guard against a hang
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "eos" / "results.json").read_text())
    assert [run["lr"] for run in runs] == [0.05, 0.1] and [run["limit"] for run in runs] == [40.0, 20.0]
    assert all(len(run["loss"]) == 20 and [s for s, _ in run["sharpness"]] == [0, 5, 10, 15] for run in runs)
    assert (tmp_path / "eos" / "edge_of_stability.png").stat().st_size > 0
    assert "| 0.05 | 40 |" in (tmp_path / "eos" / "report.md").read_text()


def test_bench_time_to_accuracy(tmp_path: Path) -> None:
    run_smoke("bench_time_to_accuracy.py", tmp_path, "--part", "fast94", "--json", str(tmp_path / "fast94.json"))
    figures = json.loads((tmp_path / "fast94.json").read_text())["fast94_lightning"]
    assert 0.0 <= figures["accuracy_mean"] <= 1.0 and len(figures["times_s"]) == 1 and figures["first_run_s"] > 0
    lines = run_smoke("bench_time_to_accuracy.py", tmp_path, "--part", "profile", "--rows", "3")
    assert any("top ops" in line for line in lines)


def test_bench_gpu_throughput(tmp_path: Path) -> None:
    run_smoke("bench_gpu_throughput.py", tmp_path, "--part", "throughput", "--json", str(tmp_path / "t.json"))
    figures = json.loads((tmp_path / "t.json").read_text())["throughput"]["resnet20"]
    assert set(figures["images_per_s"]) == {"lightning", "lightning_callback", "raw"}
    assert figures["lightning_over_raw_time"] > 0
    run_smoke("bench_gpu_throughput.py", tmp_path, "--part", "augment", "--json", str(tmp_path / "a.json"))
    augment = json.loads((tmp_path / "a.json").read_text())["augment"]
    assert augment["augment_fraction_of_step"] > 0 and augment["resnet20_step_ms"] > 0


def test_gpu_suite_dry_run_writes_each_part(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SUITE_PARTS": "fast94 augment host"}
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--smoke"],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert {"fast94.json", "augment.json", "host_overhead.json", "suite.log"} <= {p.name for p in tmp_path.iterdir()}
    log = (tmp_path / "suite.log").read_text()
    assert "== fast94: exit 0" in log and "== host: exit 0" in log


def test_pathology_zoo_smoke_cases_get_their_labels(tmp_path: Path) -> None:
    # One case per label (healthy, vanishing, exploding, unstable, collapse, stalled); seeded, and each verdict has a
    # wide margin (a 15/20-layer vanishing, NaN from step 4, a loss 7,000x its start that never comes down, a 929x
    # collapse, no spike at all in the healthy run, a loss that fell 3% where 5% would count as progress).
    lines = run_smoke("pathology_zoo.py", tmp_path, "--out", str(tmp_path / "zoo.json"))
    assert json.loads(lines[-1]) == {"correct": 6, "borne_out": 6, "cases": 6}
    saved = json.loads((tmp_path / "zoo.json").read_text())
    labels = {"healthy", "vanishing", "exploding", "unstable", "collapse", "stalled"}
    assert {case["label"] for case in saved["cases"]} == labels
    assert sum(sum(row.values()) for row in saved["confusion"].values()) == 6 and saved["false_alarms"] == 0
    (unstable,) = [case for case in saved["cases"] if case["label"] == "unstable"]
    assert unstable["alerts"][0]["kind"] == "unstable" and unstable["alert_latency"] >= 0
    assert all(saved["confusion"][label][label] == 1 for label in saved["confusion"])


def test_repair_bench_smoke_cases(tmp_path: Path) -> None:
    # Structure, not outcomes: each failing case's remedy and its before/after outcome are recorded, the healthy
    # case costs one probe and is left alone (its verdict has the zoo's wide margins), and the totals add up.
    run_smoke("repair_bench.py", tmp_path, "--out", str(tmp_path / "repair.json"))
    saved = json.loads((tmp_path / "repair.json").read_text())
    rows = {row["name"]: row for row in saved["cases"]}
    assert set(rows) == {"mlp-adam", "big-init"}
    assert rows["mlp-adam"]["untouched"] and rows["mlp-adam"]["runs"] == 1 and rows["mlp-adam"]["cost"] == 1.0
    failing = rows["big-init"]
    assert failing["detected"] == "exploding" and failing["runs"] == len(failing["trials"]) + 1 >= 2
    assert {"before", "after", "remedy", "repaired", "cost"} <= set(failing) and failing["cost"] > 1
    assert saved["failing_cases"] == 1 and saved["healthy_cases"] == 1 and saved["healthy_changed"] == 0
    assert saved["repaired"] == int(failing["repaired"])


def test_repair_bench_random_baseline_offers_adamw_to_sgd_runs_only() -> None:
    from benchmarks import pathology_zoo as zoo
    from benchmarks import repair_bench

    def names(module: object) -> list[str]:
        return [remedy.name for remedy in repair_bench.catalogue(module, 100)]  # type: ignore[arg-type]

    assert "adamw instead of sgd" in names(zoo.Supervised(zoo.he_mlp(2), optimizer="sgd"))
    assert "adamw instead of sgd" not in names(zoo.Supervised(zoo.he_mlp(2), optimizer="adam"))
    assert repair_bench.random_rate(1, 8, 7) == pytest.approx(7 / 8) and repair_bench.random_rate(0, 8, 3) == 0


def test_bench_sharpness_methods(tmp_path: Path) -> None:
    figures = json.loads(run_smoke("bench_sharpness_methods.py", tmp_path)[-1])
    assert set(figures["by_products"]) == {"3", "5"}
    assert {
        "cold_lanczos",
        "cold_power",
        "warm_lanczos",
        "warm_power",
        "cold_lanczos_1e-2",
        "warm_lanczos_1e-2",
    } <= set(figures)
    assert figures["reference"] > 0 and 1 <= figures["warm_lanczos"]["products"] <= 20


def test_bench_sharpness_sample(tmp_path: Path) -> None:
    rows = json.loads(run_smoke("bench_sharpness_sample.py", tmp_path)[-1])
    assert [row["step"] for row in rows] == [2, 4]
    # The smoke run divides the sizes 32, 64, 128, 512 by 16.
    assert all(list(row["by_size"]) == ["2", "4", "8", "32"] and len(row["other_batches"]) == 3 for row in rows)
    assert all(value > 0 for row in rows for value in [*row["by_size"].values(), *row["other_batches"]])


def test_bench_monitor_step(tmp_path: Path) -> None:
    figures = json.loads(run_smoke("bench_monitor_step.py", tmp_path)[-1])
    assert figures["step_ms"] > 0 and figures["observe_ms"] > 0
    # The fraction is rounded to 5 decimals: at most 5e-6 off.
    assert figures["observe_fraction_of_step"] == pytest.approx(figures["observe_ms"] / figures["step_ms"], abs=5e-6)


def test_bench_host_overhead(tmp_path: Path) -> None:
    figures = json.loads(run_smoke("bench_host_overhead.py", tmp_path, "--json", str(tmp_path / "host.json"))[-1])
    assert json.loads((tmp_path / "host.json").read_text()) == figures
    for family in ("image", "recurrent", "gan"):
        assert set(figures[family]) == {"raw", "lightning", "module", "callback", "project"}
        assert figures[family]["lightning"]["median_above_lightning_ms"] == 0.0
        assert figures[family]["raw"]["median_ratio_to_raw"] == 1.0
        assert all(row["median_ms"] > 0 and row["steps"] == 2 * (12 - 1 - 2) for row in figures[family].values())
