"""`moecompose diff`: changed settings per layer range, sources, and what they cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import moecompose as mc
from moecompose.cli import main

BTX = """
moecompose: 1
sources: {seed: $seed, code: $code, law: $law}
layers:
  - select: all
    ffn:
      experts: [seed, code, law]
      router: {kind: topk, k: 2}
"""

BTX_K1_DSL = """
# the same experiment with k = 1, in the text syntax, defaults spelled out
moecompose 1
seed 0
merge average
sources { law = $law; code = $code; seed = $seed }
layers all {
  ffn router=topk(k=1, normalize=true) experts=[seed, code, law] aux_loss=(load_balance=0.01)
}
output format=auto
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_router_k_change_is_the_only_change_and_its_cost_matches_the_plans(write_spec) -> None:
    a = write_spec(BTX, "a.yaml")
    b = write_spec(BTX_K1_DSL, "b.moe")
    result = mc.diff(a, b)
    assert not result.equal
    assert [(c.path, c.old, c.new, c.layers) for c in result.changes] == [
        ("ffn.router.k", 2, 1, (0, 1, 2, 3))
    ]
    assert result.changes[0].where == "layers 0–3"
    assert not result.sources_added and not result.sources_removed
    plan_a, plan_b = mc.plan(a), mc.plan(b)
    assert result.plan is not None
    assert result.plan.delta("active_params") == plan_b.totals.active_params - plan_a.totals.active_params < 0
    assert result.plan.delta("flops_per_token") == plan_b.totals.flops_per_token - plan_a.totals.flops_per_token < 0
    assert result.plan.delta("params") == 0
    assert not result.plan.added and not result.plan.removed and not result.plan.changed

    cli = invoke("diff", str(a), str(b))
    assert cli.exit_code == 1
    assert "layers 0–3" in cli.output and "ffn.router.k" in cli.output
    data = json.loads(invoke("diff", str(a), str(b), "--json").output)
    assert data["equal"] is False and len(data["changes"]) == 1
    assert data["changes"][0] | {"layers": None} == {
        "path": "ffn.router.k", "old": 2, "new": 1, "layers": None, "layer_range": "0–3"}
    totals = data["plan"]["totals"]
    assert totals["active_params"]["delta"] == plan_b.totals.active_params - plan_a.totals.active_params
    assert totals["flops_per_token"]["delta"] == plan_b.totals.flops_per_token - plan_a.totals.flops_per_token


def test_same_meaning_in_other_words_is_equal(write_spec) -> None:
    a = write_spec(BTX, "a.yaml")
    b = write_spec(BTX_K1_DSL.replace("topk(k=1,", "topk(k=2,"), "b.moe")
    result = mc.diff(a, b)
    assert result.equal, result.to_data()
    assert invoke("diff", str(a), str(b)).exit_code == 0
    assert "same model" in invoke("diff", str(a), str(b)).output


def test_equivalent_rules_written_differently_are_equal(write_spec) -> None:
    a = write_spec(BTX, "a.yaml")
    b = write_spec(BTX.replace("select: all", "select: {from: 0, to: 2}") + """
  - select: [2, 3]
    ffn: {experts: [seed, code, law]}
""", "b.yaml")
    assert mc.diff(a, b).equal


def test_overrides_are_collapsed_into_layer_ranges(write_spec) -> None:
    a = write_spec(BTX, "a.yaml")
    b = write_spec(BTX + """
  - select: {from: 2, to: 4}
    ffn:
      experts: {copy: seed, count: 4}
""", "b.yaml")
    result = mc.diff(a, b)
    assert [(c.where, c.path, c.new) for c in result.changes] == [
        ("layers 2–3", "ffn.experts", {"copy": "seed", "count": 4, "drop": 0.0})
    ]
    assert result.plan is not None
    assert result.plan.delta("params") == mc.plan(b).totals.params - mc.plan(a).totals.params
    assert result.plan.added and result.plan.removed  # other tensor names: mixtral -> native
    assert result.plan.format == ("mixtral", "native")


def test_sources_added_and_removed(write_spec) -> None:
    a = write_spec(BTX, "a.yaml")
    b = write_spec(BTX.replace("law: $law}", "other: $law}").replace("code, law]", "code, other]"),
                   "b.yaml")
    result = mc.diff(a, b)
    assert set(result.sources_added) == {"other"} and set(result.sources_removed) == {"law"}
    assert [c.path for c in result.changes] == ["ffn.experts"]
    assert result.plan is not None and result.plan.changed  # recipes name the other source
    output = invoke("diff", str(a), str(b)).output
    assert "added" in output and "removed" in output


def test_without_sources_the_spec_diff_is_shown_and_the_plan_skipped(tmp_path: Path) -> None:
    a = tmp_path / "a.moe"
    b = tmp_path / "b.moe"
    a.write_text("moecompose 1\nsources { x = ./missing }\nlayers all { ffn experts=copy(x, count=4) }\n")
    b.write_text("moecompose 1\nsources { x = ./missing }\nlayers all { ffn experts=copy(x, count=4) }\n"
                 "layers 0..2 { ffn experts=copy(x, count=4) router=topk(k=1) }\n")
    result = mc.diff(a, b)
    assert result.plan is None and "does not exist" in (result.plan_skipped or "")
    assert [(c.where, c.path) for c in result.changes] == [("layers 0–1", "ffn.router.k")]
    cli = invoke("diff", str(a), str(b))
    assert cli.exit_code == 1 and "plan comparison skipped" in cli.output
    assert json.loads(invoke("diff", str(a), str(b), "--json").output)["plan"]["compared"] is False


def test_a_bad_spec_is_a_user_error(tmp_path: Path) -> None:
    good = tmp_path / "a.moe"
    good.write_text("moecompose 1\nsources { x = ./missing }\n")
    bad = tmp_path / "b.moe"
    bad.write_text("moecompose 1\nsources { x = ./missing \n")
    result = CliRunner().invoke(main, ["diff", str(good), str(bad)])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    result = CliRunner().invoke(main, ["diff", str(good), str(tmp_path)])
    assert result.exit_code == 2 and "without plan.json" in result.output


@pytest.mark.slow
def test_an_artifact_equals_its_spec_and_differs_from_a_variant(write_spec, tmp_path: Path) -> None:
    spec = write_spec(BTX, "btx.yaml")
    mc.build(spec, tmp_path / "out")
    assert mc.diff(spec, tmp_path / "out").equal
    assert mc.diff(tmp_path / "out", spec).equal
    other = write_spec(BTX_K1_DSL, "k1.moe")
    result = mc.diff(tmp_path / "out", other)
    assert [c.path for c in result.changes] == ["ffn.router.k"]
