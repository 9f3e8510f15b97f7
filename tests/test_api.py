"""The documented Python API: load_spec, validate, plan, build, load, diff, and variants."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import moecompose as mc

ROOT = Path(__file__).resolve().parent.parent

DSL = """
moecompose 1
sources { seed = $seed; code = $code; law = $law }
layers all { ffn experts=[seed, code, law] router=topk(k=2) }
"""


@pytest.mark.parametrize("name", ["load_spec", "validate", "plan", "build", "load", "diff"])
def test_api_functions_are_exported_and_documented(name: str) -> None:
    function = getattr(mc, name)
    assert callable(function) and inspect.getdoc(function)
    assert name in mc.__all__


def test_a_sweep_is_a_few_lines_of_variants(write_spec) -> None:
    spec = mc.load_spec(write_spec(DSL, "btx.moe"))
    assert mc.validate(spec).moe_layers
    active = {k: mc.plan(spec.with_({"layers[0].ffn.router.k": k})).totals.active_params
              for k in (1, 2, 3)}
    assert active[1] < active[2] < active[3]
    variant = spec.with_({"layers[0].ffn.router": {"kind": "topk", "k": 1}}, seed=5)
    assert variant.origin.base_dir == spec.origin.base_dir  # relative paths still resolve
    changes = mc.diff(spec, variant).changes
    assert [(c.path, c.old, c.new) for c in changes] == [("seed", 0, 5), ("ffn.router.k", 2, 1)]


def test_variants_are_revalidated() -> None:
    spec = mc.load_spec(ROOT / "specs" / "btx.moe")
    with pytest.raises(ValueError, match="k"):
        spec.with_({"layers[0].ffn.router.k": 0})


@pytest.mark.slow
def test_build_and_load_a_dsl_spec(write_spec, tmp_path: Path) -> None:
    result = mc.build(write_spec(DSL, "btx.moe"), tmp_path / "out")
    model = mc.load(result.path)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 128)
    assert mc.diff(write_spec(DSL, "btx.moe"), result.path).equal


def test_json_schema_describes_every_model_and_the_top_level() -> None:
    import json

    from click.testing import CliRunner

    from moecompose.cli import main

    schema = json.loads(CliRunner().invoke(main, ["schema"]).output)
    assert schema["description"] and schema["properties"]["sources"]["description"]
    for name, model in schema["$defs"].items():
        assert model.get("description") or "enum" in model, name
