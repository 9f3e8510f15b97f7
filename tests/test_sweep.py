"""examples/sweep.py runs on tiny sources: a grid of variants planned side by side."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import moecompose as mc

ROOT = Path(__file__).resolve().parent.parent

BASE = """
moecompose 1
sources { base = $seed }
layers 0..4 every 2 { ffn experts=copy(base, count=8, drop=0.5) router=topk(k=2) }
"""


def sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "examples" / "sweep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_plans_valid_variants_and_lists_refusals(write_spec, capsys) -> None:
    base = write_spec(BASE, "base.moe")
    module = sweep()
    grid = module.variants(mc.load_spec(base), [1, 2, 4], [1, 2], ["topk", "soft"])
    assert set(grid) == {"e1-k1-topk", "e2-k1-topk", "e2-k2-topk", "e4-k1-topk", "e4-k2-topk",
                         "e1-soft", "e2-soft", "e4-soft"}  # k > experts left out
    assert grid["e4-k2-topk"].layers[0].ffn.experts.count == 4  # type: ignore[union-attr]
    code = module.main(["--base", str(base), "--experts", "2,4", "--k", "1,2"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("e2-k1-topk", "e2-k2-topk", "e4-k1-topk", "e4-k2-topk"):
        assert name in out
    plans = {n: mc.plan(grid[n]) for n in ("e2-k1-topk", "e4-k1-topk")}
    assert plans["e4-k1-topk"].totals.params > plans["e2-k1-topk"].totals.params


def test_an_unknown_variant_is_an_error(write_spec, capsys) -> None:
    base = write_spec(BASE, "base.moe")
    assert sweep().main(["--base", str(base), "--build", "e3-k9-topk"]) == 2
    assert "no variant e3-k9-topk" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_builds_the_variants_asked_for(write_spec, tmp_path: Path) -> None:
    base = write_spec(BASE, "base.moe")
    code = sweep().main(["--base", str(base), "--experts", "2", "--k", "1", "--routers", "topk",
                         "--build", "e2-k1-topk", "-o", str(tmp_path / "sweep")])
    assert code == 0
    model = mc.load(tmp_path / "sweep" / "e2-k1-topk")
    assert model is not None


def test_sweep_runs_on_the_bundled_demo_sources(capsys) -> None:
    assert sweep().main([]) == 0
    out = capsys.readouterr().out
    assert "e2-k1-topk" in out and "e8-k2-topk" in out and "e8-soft" in out
