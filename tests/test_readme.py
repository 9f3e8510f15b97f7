"""The README's examples run as pasted."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_python_examples() -> None:
    assert len(_python_blocks()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(2))
def test_readme_python_example_runs_and_prints_what_it_says(index: int, tmp_path: Path) -> None:
    """Run in a copy of the repository's specs folder; a comment line right after a
    ``print`` is the output it promises."""
    block = _python_blocks()[index]
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    (tmp_path / "example.py").write_text(block)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = block.splitlines()
    promised = [after[2:] for before, after in itertools.pairwise(lines)
                if before.startswith("print(") and after.startswith("# ")]
    assert promised, "the example promises no output"
    for text in promised:
        assert text in result.stdout.splitlines(), (text, result.stdout)
    built = tmp_path / "out" / ("demo" if index == 0 else "pesc")
    assert (built / "model.safetensors").is_file()
