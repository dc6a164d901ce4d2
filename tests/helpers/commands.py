"""The ``stabilize`` command in a subprocess, able to import the tests' helper callbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def stabilize_command(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m stabilize`` (the console script's entry point) with the repository on ``PYTHONPATH``."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "stabilize", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def python_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a test's own Python script (e.g. one Lightning relaunches per DDP rank), the repository importable;
    fails the test with the end of stderr when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
