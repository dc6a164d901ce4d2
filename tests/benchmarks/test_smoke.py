"""The benchmark scripts run (in --smoke mode: tiny data, seconds) and print what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_smoke(script: str, tmp_path: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


def test_bench_datamodule(tmp_path: Path) -> None:
    lines = run_smoke("bench_datamodule.py", tmp_path)
    figures, paths = json.loads(lines[-3]), json.loads(lines[-1])
    assert figures["ours_images_per_s"] > 0 and figures["baseline_images_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["ours_images_per_s"] / figures["baseline_images_per_s"], rel=0.01)
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


def test_bench_time_to_accuracy(tmp_path: Path) -> None:
    figures = json.loads(run_smoke("bench_time_to_accuracy.py", tmp_path)[-1])
    assert 0.0 <= figures["lightning_fast94"]["accuracy_mean"] <= 1.0
    assert set(figures["throughput"]) == {"resnet20", "resnet56"}
    assert "skipped" in figures["airbench94"] or "time_ratio" in figures
