"""Fine-grained experts (`granularity: G`, He et al. 2024): each FFN expert cut into G
shards of its intermediate width, router rows repeated G times, top-(k*G) routing, and the
layer equal to the coarse MoE at build time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from click.testing import CliRunner
from helpers import (
    IDS,
    assert_compiled_inference_matches_eager,
    assert_compiled_training_matches_eager,
    hf_logits,
    weights,
)
from torch._dynamo.utils import counters

import moecompose
from moecompose import MoeComposeError
from moecompose.cli import main
from moecompose.model.compile import supports_shapes_spec
from moecompose.plan.recipe import Recipe
from moecompose.sources.checkpoint import open_checkpoint
from moecompose.spec import parse_spec

EXPERTS = {
    "copies": "{copy: seed, count: 2}",
    "sources": "[seed, code, law]",
    "dropped": "{copy: seed, count: 2, drop: 0.5}",
}


def mix_spec(write_spec, experts: str, g: int, *, normalize: bool = True, k: int = 2,
             fmt: str = "native", extra: str = "", name: str = "spec.yaml") -> Path:
    return write_spec(
        f"""
        moecompose: 1
        sources: {{seed: $seed, code: $code, law: $law}}
        layers:
          - select: all
            ffn:
              experts: {experts}
              granularity: {g}
              router: {{kind: topk, k: {k}, normalize: {str(normalize).lower()}{extra}}}
        output: {{format: {fmt}}}
        """,
        name=name,
    )


def built(spec: Path, out: Path) -> Path:
    return moecompose.build(spec, out).path


def logits(path: Path, ids: torch.Tensor = IDS, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return moecompose.load(path)(ids, attention_mask=mask).logits


LEFT_PADDED = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]])


def assert_same_logits(fine: Path, coarse: Path) -> None:
    """Equal logits for a batch of token ids, and for it left-padded (real tokens only)."""
    assert (logits(fine) - logits(coarse)).abs().max().item() <= 1e-5
    real = LEFT_PADDED.bool()
    a, b = logits(fine, mask=LEFT_PADDED), logits(coarse, mask=LEFT_PADDED)
    assert (a[real] - b[real]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- exactness at build time


def test_two_shards_of_different_experts_reproduce_the_coarse_moe(write_spec, tmp_path) -> None:
    coarse = built(mix_spec(write_spec, EXPERTS["sources"], 1, name="coarse.yaml"), tmp_path / "c")
    fine = built(mix_spec(write_spec, EXPERTS["sources"], 2, name="fine.yaml"), tmp_path / "f")
    assert_same_logits(fine, coarse)


@pytest.mark.slow
@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("experts", list(EXPERTS))
@pytest.mark.parametrize("normalize", [True, False])
def test_granular_experts_reproduce_the_coarse_moe(write_spec, tmp_path, g, experts, normalize) -> None:
    """Each shard gets p/G (w/G renormalised), top-(k*G) keeps the G shards of each of the
    top-k experts, and down x G makes the shards sum to the expert."""
    text = EXPERTS[experts]
    coarse = built(mix_spec(write_spec, text, 1, normalize=normalize, name="c.yaml"), tmp_path / "c")
    fine = built(mix_spec(write_spec, text, g, normalize=normalize, name="f.yaml"), tmp_path / "f")
    assert_same_logits(fine, coarse)


@pytest.mark.slow
def test_shards_are_slices_of_the_expert_with_down_scaled_and_rows_repeated(
    write_spec, tmp_path, sources
) -> None:
    g = 4
    coarse = weights(built(mix_spec(write_spec, EXPERTS["sources"], 1, name="c.yaml"), tmp_path / "c"))
    fine = weights(built(mix_spec(write_spec, EXPERTS["sources"], g, name="f.yaml"), tmp_path / "f"))
    prefix = "model.layers.1.mlp"
    assert torch.equal(fine[f"{prefix}.router.weight"],
                       coarse[f"{prefix}.router.weight"].repeat_interleave(g, dim=0))
    for proj, dim in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 2)):
        whole = coarse[f"{prefix}.experts.{proj}"]  # [E, f, d] or [E, d, f]
        shards = fine[f"{prefix}.experts.{proj}"]  # [E*G, f/G, d] or [E*G, d, f/G]
        scale = g if proj == "down_proj" else 1
        expected = torch.stack([part for e in whole for part in e.chunk(g, dim=dim - 1)]) * scale
        assert torch.equal(shards, expected), proj


@pytest.mark.slow
def test_prompt_initialised_rows_are_repeated_per_shard(write_spec, tmp_path) -> None:
    prompts = ", init: {prompts: {seed: ['hello there'], code: ['def f(x):']}}"
    coarse = built(mix_spec(write_spec, "[seed, code]", 1, k=1, extra=prompts, name="c.yaml"),
                   tmp_path / "c")
    fine = built(mix_spec(write_spec, "[seed, code]", 2, k=1, extra=prompts, name="f.yaml"),
                 tmp_path / "f")
    assert_same_logits(fine, coarse)


# ------------------------------------------------------------------ exports, compile, train


@pytest.mark.slow
def test_granular_mixtral_export_loads_in_transformers_with_our_logits(write_spec, tmp_path) -> None:
    coarse = built(mix_spec(write_spec, EXPERTS["sources"], 1, name="c.yaml"), tmp_path / "c")
    out = built(mix_spec(write_spec, EXPERTS["sources"], 4, fmt="mixtral", name="f.yaml"),
                tmp_path / "f")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (12, 8)
    assert config["intermediate_size"] == 96 // 4
    ours = logits(out)
    assert (hf_logits(out, "MixtralForCausalLM") - ours).abs().max().item() <= 1e-5
    assert (ours - logits(coarse)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_granular_qwen2_moe_export_keeps_the_shared_expert_whole(write_spec, tmp_path) -> None:
    def spec(g: int) -> Path:
        return write_spec(
            f"""
            moecompose: 1
            sources: {{seed: $qwen_seed, code: $qwen_code, law: $qwen_law}}
            layers:
              - select: all
                ffn:
                  shared: seed
                  experts: [code, law]
                  granularity: {g}
                  router: {{kind: topk, k: 1, normalize: false}}
            output: {{format: qwen2_moe}}
            """,
            name=f"q{g}.yaml",
        )

    coarse, fine = built(spec(1), tmp_path / "c"), built(spec(2), tmp_path / "f")
    config = json.loads((fine / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["moe_intermediate_size"] * 2 == config["shared_expert_intermediate_size"]
    ours = logits(fine)
    assert (hf_logits(fine, "Qwen2MoeForCausalLM") - ours).abs().max().item() <= 1e-5
    assert (ours - logits(coarse)).abs().max().item() <= 1e-5


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))


@pytest.mark.slow
@pytest.mark.skipif(not supports_shapes_spec(),
                    reason="shape-stable compile needs torch.compile(shapes_spec=)")
def test_granular_model_compiles_once_and_matches_eager(write_spec, tmp_path) -> None:
    model = moecompose.load(built(mix_spec(write_spec, EXPERTS["sources"], 4), tmp_path / "f"))
    torch._dynamo.reset()
    counters.clear()
    assert_compiled_inference_matches_eager(model, [(2, 7), (3, 20)], _ids)
    torch._dynamo.reset()
    counters.clear()
    assert_compiled_training_matches_eager(model, [(2, 7), (3, 20)], _ids)


@pytest.mark.slow
def test_granular_model_trains(write_spec, tmp_path) -> None:
    model = moecompose.load(built(mix_spec(write_spec, EXPERTS["sources"], 2), tmp_path / "f"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    router = model.model.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- the plan


def test_plan_counts_fine_experts_and_keeps_active_expert_params(write_spec, sources) -> None:
    g, n, k = 4, 3, 2
    coarse = moecompose.plan(mix_spec(write_spec, EXPERTS["sources"], 1, name="c.yaml"))
    fine = moecompose.plan(mix_spec(write_spec, EXPERTS["sources"], g, name="f.yaml"))
    a = open_checkpoint("seed", sources["seed"]).arch
    d, f, layers = a.hidden_size, a.intermediate_size, a.num_hidden_layers
    extra_router = layers * n * (g - 1) * d  # the repeated rows are real parameters

    experts = [t for t in fine.tensors if t.group == "experts"]
    assert sum(t.numel for t in experts) == layers * n * g * 3 * d * (f // g)
    assert {t.shape for t in experts} == {(n * g, f // g, d), (n * g, d, f // g)}
    assert fine.totals.params == coarse.totals.params + extra_router

    def active_experts(plan) -> float:
        return sum(t.numel * t.active for t in plan.tensors if t.group == "experts")

    assert active_experts(fine) == pytest.approx(active_experts(coarse))
    assert fine.totals.active_params == coarse.totals.active_params + extra_router
    assert fine.totals.flops_per_token == coarse.totals.flops_per_token + 2 * extra_router

    moe = fine.config["layers"][0]["ffn"]
    assert (moe["num_experts"], moe["intermediate_size"], moe["router"]["k"]) == (n * g, f // g, k * g)
    row = fine.layers[0]
    assert row["router"] == "topk k=2 x G=4 (k=8 of 12)"
    assert "in 4 shards (12 experts of width 24, down x4)" in row["experts"]


def test_recipes_slice_each_expert_and_repeat_router_rows(write_spec) -> None:
    plan = moecompose.plan(mix_spec(write_spec, EXPERTS["copies"], 2))
    by_name = {t.name: t for t in plan.tensors}
    router = by_name["model.layers.0.mlp.router.weight"].recipe
    assert router.args["repeat"] == 2
    assert router.summary() == "normal(std=0.02), rows x2"
    down = by_name["model.layers.0.mlp.experts.down_proj"].recipe
    assert [p.op for p in down.parts] == ["slice"] * 4
    assert down.parts[1].args == {"dim": 1, "start": 48, "end": 96, "scale": 2.0}
    assert down.summary() == "stack(2 x seed in 2 col shards x 2)"
    assert down.parts[1].summary() == "slice(seed, cols 48-95) x 2"
    again = Recipe.from_data(json.loads(json.dumps(down.to_data())))
    assert again == down


def test_granularity_one_plans_as_before(write_spec) -> None:
    """No slices, no repeats: the recipes of a spec without the field."""
    plan = moecompose.plan(mix_spec(write_spec, EXPERTS["sources"], 1))
    ops = {p.op for t in plan.tensors for p in (t.recipe, *t.recipe.parts)}
    assert "slice" not in ops
    assert not any("repeat" in t.recipe.args for t in plan.tensors)


def test_zero_router_rows_warn_that_shards_tie(write_spec) -> None:
    plan = moecompose.plan(mix_spec(write_spec, EXPERTS["copies"], 2, extra=", init: zeros"))
    assert any("granularity with router init: zeros" in w for w in plan.warnings)


def test_layers_of_different_granularity_are_native_only(write_spec) -> None:
    text = """
        moecompose: 1
        sources: {{seed: $seed}}
        layers:
          - select: all
            ffn: {{experts: {{copy: seed, count: 4}}, router: {{kind: topk, k: 2}}}}
          - select: [1]
            ffn: {{experts: {{copy: seed, count: 2}}, granularity: 2, router: {{kind: topk, k: 1}}}}
        output: {{format: {fmt}}}
        """
    assert moecompose.plan(write_spec(text.format(fmt="auto"))).format == "native"
    with pytest.raises(MoeComposeError, match="differ in granularity"):
        moecompose.plan(write_spec(text.format(fmt="mixtral")))


# ------------------------------------------------------------------------ located errors

HEAD = "moecompose: 1\nsources: {seed: $seed, code: $code}\nlayers:\n  - select: all\n    ffn:\n"


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("      experts: {adapters: seed, count: 4}\n      granularity: 2\n"
         "      router: {kind: topk, k: 2}\n", "adapter experts (PESC)"),
        ("      experts: [seed, code]\n      granularity: 2\n"
         "      router: {kind: token_mixing, group_size: 2}\n", "not token_mixing"),
        ("      experts: [seed, code]\n      granularity: 2\n      router: {kind: soft}\n",
         "not soft"),
        ("      experts: [seed, code]\n      granularity: 2\n      router: {kind: nexus, k: 1}\n",
         "not nexus"),
        ("      experts: [seed, code]\n      granularity: 5\n", "intermediate_size 96 in source 'seed'"),
        ("      experts: [seed, code]\n      granularity: 0\n", "at least 1"),
    ],
    ids=["adapters", "token-mixing", "soft", "nexus", "width", "zero"],
)
def test_granularity_errors_are_located(write_spec, body: str, expect: str) -> None:
    spec = write_spec(HEAD + body)
    with pytest.raises(MoeComposeError) as info:
        moecompose.validate(spec)
    message = info.value.format()
    assert message.startswith(f"{spec}:7:20: "), message
    assert "granularity" in message and expect in message, message


def test_width_error_suggests_divisors(write_spec) -> None:
    spec = write_spec(HEAD + "      experts: [seed, code]\n      granularity: 5\n")
    with pytest.raises(MoeComposeError) as info:
        moecompose.validate(spec)
    assert info.value.hint is not None and "2, 3, 4, 6, 8" in info.value.hint


# ------------------------------------------------------------------------------ syntax


def test_dsl_round_trips_granularity(write_spec, tmp_path) -> None:
    path = mix_spec(write_spec, EXPERTS["copies"], 4)
    dsl = CliRunner().invoke(main, ["fmt", str(path), "--to", "dsl"], catch_exceptions=False)
    assert dsl.exit_code == 0 and "granularity=4" in dsl.output, dsl.output
    moe = tmp_path / "spec.moe"
    moe.write_text(dsl.output)
    back = CliRunner().invoke(main, ["fmt", str(moe), "--to", "yaml"], catch_exceptions=False)
    assert back.exit_code == 0 and "granularity: 4" in back.output, back.output
    spec = moecompose.load_spec(path, check=False)
    assert parse_spec(dsl.output, syntax="dsl", check=False) == spec
    assert parse_spec(back.output, syntax="yaml", check=False) == spec
    assert spec.layers[0].ffn is not None and spec.layers[0].ffn.granularity == 4


def test_extend_refuses_a_granular_artifact_with_one_line(tmp_path: Path, write_spec) -> None:
    from moecompose.errors import SpecError

    path = write_spec("""
        moecompose: 1
        sources: {seed: $seed, code: $code}
        layers:
        - select: all
          ffn: {experts: [seed, code], granularity: 2}
        output: {format: native}
    """)
    built = moecompose.build(path, tmp_path / "granular").path
    with pytest.raises(SpecError, match="granularity > 1 in layer rule 0"):
        moecompose.extend(built, tmp_path / "ext", expert="law", source=tmp_path,
                          prompts=("law",))
