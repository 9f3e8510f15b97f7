"""The bundled examples and specs keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import moecompose

ROOT = Path(__file__).resolve().parent.parent
BUILDABLE = ["demo", "btx", "sparse_upcycling", "bam", "pesc", "mixture_of_tokens", "nexus"]



@pytest.mark.parametrize("name", BUILDABLE)
def test_bundled_spec_validates_against_demo_sources(name: str) -> None:
    resolved = moecompose.validate(ROOT / "specs" / f"{name}.yaml")
    assert resolved.moe_layers


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path / "qs")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "k=3" in result.stdout and "logits (1, 5, 128)" in result.stdout
