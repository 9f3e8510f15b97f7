"""Shared fixtures: tiny real checkpoints written by transformers, and spec files."""

from __future__ import annotations

import string
import textwrap
from pathlib import Path

import pytest

from moecompose.testing import make_dense


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense sources: a Llama seed with three branches, a Qwen2 seed with two branches, a
    Mistral model (and one whose sliding window, 4, is shorter than the test texts), a
    tied-embedding Llama, and a Llama of a different width."""
    root = tmp_path_factory.mktemp("dense")
    out = {
        "seed": make_dense(root / "seed", seed=0),
        "code": make_dense(root / "code", seed=1, base_seed=0),
        "law": make_dense(root / "law", seed=2, base_seed=0),
        "math": make_dense(root / "math", seed=9, base_seed=0),
        "qwen_seed": make_dense(root / "qwen_seed", family="qwen2", seed=3),
        "qwen_code": make_dense(root / "qwen_code", family="qwen2", seed=4, base_seed=3),
        "qwen_law": make_dense(root / "qwen_law", family="qwen2", seed=5, base_seed=3),
        "mistral": make_dense(root / "mistral", family="mistral", seed=6),
        "mistral_window": make_dense(root / "mistral_window", family="mistral", seed=10, sliding_window=4),
        "tied": make_dense(root / "tied", seed=7, tie_word_embeddings=True),
        "wide": make_dense(root / "wide", seed=8, hidden_size=96),
    }
    return out


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's error console behaves as on a terminal (it shows .moe snippets there)."""
    import moecompose.cli

    monkeypatch.setattr(moecompose.cli, "err", moecompose.cli.plain_console(
        stderr=True, force_terminal=True, color_system=None))


@pytest.fixture
def write_spec(tmp_path: Path, sources: dict[str, Path]):
    """Write a YAML spec into a fresh folder; ``$seed``-style placeholders name the paths of
    the ``sources`` fixtures."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        body = textwrap.dedent(text).strip() + "\n"
        body = string.Template(body).safe_substitute({k: str(v) for k, v in sources.items()})
        path = tmp_path / name
        path.write_text(body)
        return path

    return write
