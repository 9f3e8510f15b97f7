"""Every benchmark script runs end to end in its quick form and prints its ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["moe_layer", "adapters", "mot", "moa", "nexus", "window"])
def test_layer_benchmark_prints_ratios(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--no-compile"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ratios (lower is better):" in result.stdout
    assert "x   fwd+bwd" in result.stdout


def test_build_benchmark_reports_peak_memory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "build.py"), "--quick", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "ratio moecompose (cold) / naive" in result.stdout and "peak RSS" in result.stdout
    # without mergekit-moe (CI), its row is skipped with the way to install it
    assert "mergekit-moe: not found, skipped" in result.stdout


def test_load_benchmark_reports_time_and_memory_ratios(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--quick", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ratios (lower is better): load / read time") == 2
    assert "above idle" in result.stdout and "x model" in result.stdout


def test_train_benchmark_compares_with_the_transformers_trainer(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--quick", "--eager-only",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "moecompose tok/s" in result.stdout and "RSS ours / theirs" in result.stdout
    assert "eager" in result.stdout


def test_train_step_benchmark_compares_moe_with_its_dense_twin() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--no-compile"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "eager     moe / dense twin:" in result.stdout and "x the time" in result.stdout
