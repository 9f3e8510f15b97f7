"""The bundled examples and specs keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import moecompose
from moecompose import SpecError

ROOT = Path(__file__).resolve().parent.parent
BUILDABLE = ["demo", "btx", "sparse_upcycling", "bam", "pesc", "mixture_of_tokens"]
NOT_YET = ["nexus"]


@pytest.mark.parametrize("name", BUILDABLE)
def test_bundled_spec_validates_against_demo_sources(name: str) -> None:
    resolved = moecompose.validate(ROOT / "specs" / f"{name}.yaml")
    assert resolved.moe_layers


@pytest.mark.parametrize("name", NOT_YET)
def test_specs_of_later_methods_are_refused_with_a_located_error(name: str) -> None:
    with pytest.raises(SpecError, match="not supported by this version") as info:
        moecompose.validate(ROOT / "specs" / f"{name}.yaml")
    assert re.match(rf".*specs/{name}\.yaml:\d+:\d+: ", info.value.format())


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path / "qs")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "k=3" in result.stdout and "logits (1, 5, 128)" in result.stdout
