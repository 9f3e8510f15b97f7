"""The GPU acceptance script and the GPU benchmark run end to end on the CPU (their CUDA
parts skipped, tiny sizes), so they still work when a GPU machine gets them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )


def test_gpu_check_passes_the_demo_on_cpu(tmp_path: Path) -> None:
    """Eager checks only: compiling the bf16 graphs cold takes over two minutes on two
    cores, and compiled training and decoding are tested in tests/test_model_compile.py;
    `python benchmarks/gpu_check.py --only demo` runs the compiled checks too."""
    result = run_script("gpu_check.py", "--only", "demo", "--no-compile", "--no-timing",
                        "--out", str(tmp_path))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[FAIL]" not in out
    for check in ("build demo", "demo load bf16", "demo placement", "demo eager fwd+bwd",
                  "demo loss-only forward vs logits"):
        assert f"[PASS] {check}:" in out, check
    assert re.search(r"gpu_check done in \d+s on \w+: \d+ PASS, 0 FAIL", out)


def test_gpu_benchmark_prints_the_three_ratios_on_cpu(tmp_path: Path) -> None:
    result = run_script("gpu.py", "--cpu", "--no-compile", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    targets = result.stdout.split("\ntargets")[-1]
    for part in ("(a) moe / dense twin", "(b) moa fused / loop", "(c) decode tok/s"):
        assert re.search(rf"ratio {re.escape(part)}.* \d+\.\d\dx   target [<>]= ", targets), part
