"""End-to-end: spec -> build -> load, checked against transformers on real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import hf_logits, our_logits, weights

import moecompose
from moecompose.build.recipes import drop_indices

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("family", ["seed", "qwen_seed", "mistral", "mistral_window", "tied"])
@pytest.mark.parametrize("k", [1, 2])
def test_identical_experts_reproduce_dense_logits(write_spec, tmp_path, sources, family, k) -> None:
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{base: ${family}}}
        layers:
          - select: all
            ffn:
              experts: {{copy: base, count: 4}}
              router: {{kind: topk, k: {k}}}
        output: {{format: native}}
        """
    )
    out = moecompose.build(spec, tmp_path / "out").path
    dense = hf_logits(sources[family])
    assert (our_logits(out) - dense).abs().max().item() <= 1e-5


def test_btx_mixtral_export_matches_transformers_and_averages(write_spec, tmp_path, sources) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {seed: $seed, code: $code, law: $law}
        merge: average
        layers:
          - select: all
            ffn:
              experts: [seed, code, law]
              router: {kind: topk, k: 2}
        output: {format: auto}
        """
    )
    plan = moecompose.plan(spec)
    assert plan.format == "mixtral"
    out = moecompose.build(plan, tmp_path / "btx").path
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    ref = hf_logits(out, "MixtralForCausalLM")
    assert (our_logits(out) - ref).abs().max().item() <= 1e-5

    built = weights(out)
    srcs = [weights(sources[n]) for n in ("seed", "code", "law")]
    for name in ("model.embed_tokens.weight", "model.layers.2.self_attn.k_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight"):
        expected = (srcs[0][name] + srcs[1][name] + srcs[2][name]) / 3
        assert torch.equal(built[name], expected), name
    for j, src in enumerate(srcs):
        prefix = f"model.layers.1.block_sparse_moe.experts.{j}"
        assert torch.equal(built[f"{prefix}.w1.weight"], src["model.layers.1.mlp.gate_proj.weight"])
        assert torch.equal(built[f"{prefix}.w3.weight"], src["model.layers.1.mlp.up_proj.weight"])
        assert torch.equal(built[f"{prefix}.w2.weight"], src["model.layers.1.mlp.down_proj.weight"])


def test_sliding_window_source_exports_mixtral_with_its_window(write_spec, tmp_path, sources) -> None:
    """Mistral with a window of 4 (the test texts are 9 tokens): the Mixtral export keeps
    the window and transformers gives our logits, which are the dense model's."""
    spec = write_spec(
        """
        moecompose: 1
        sources: {base: $mistral_window}
        layers:
          - select: all
            ffn:
              experts: {copy: base, count: 2}
              router: {kind: topk, k: 1}
        output: {format: mixtral}
        """
    )
    out = moecompose.build(spec, tmp_path / "out").path
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    ours = our_logits(out)
    assert (hf_logits(out, "MixtralForCausalLM") - ours).abs().max().item() <= 1e-5
    assert (hf_logits(sources["mistral_window"]) - ours).abs().max().item() <= 1e-5


def test_shared_expert_exports_qwen2_moe_matching_transformers(write_spec, tmp_path, sources) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {seed: $qwen_seed, code: $qwen_code, law: $qwen_law}
        layers:
          - select: {from: 1, to: 4}
            ffn:
              shared: seed
              experts: [code, law]
              router: {kind: topk, k: 1, normalize: false}
        """
    )
    plan = moecompose.plan(spec)
    assert plan.format == "qwen2_moe"
    out = moecompose.build(plan, tmp_path / "qwen").path
    ref = hf_logits(out, "Qwen2MoeForCausalLM")
    assert (our_logits(out) - ref).abs().max().item() <= 1e-5


def test_gated_shared_expert_is_function_preserving(write_spec, tmp_path, sources) -> None:
    """Qwen2-MoE gates its shared expert by sigmoid(x.g); g = 0 and a doubled down-projection
    make a shared expert equal to the dense FFN at build time."""
    spec = write_spec(
        """
        moecompose: 1
        sources: {base: $seed}
        layers:
          - select: all
            ffn:
              shared: base
              experts: {copy: base, count: 2}
              router: {kind: topk, k: 1, init: zeros}
        output: {format: qwen2_moe}
        """
    )
    out = moecompose.build(spec, tmp_path / "q").path
    built = weights(out)
    dense = weights(sources["seed"])
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(built["model.layers.0.mlp.shared_expert.down_proj.weight"], 2 * dense[down])
    assert not built["model.layers.0.mlp.shared_expert_gate.weight"].any()


def test_every_other_layer_falls_back_to_native(write_spec, tmp_path, sources) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {base: $seed}
        layers:
          - select: {from: 0, to: 4, every: 2}
            ffn:
              experts: {copy: base, count: 4}
        """
    )
    plan = moecompose.plan(spec)
    assert plan.format == "native"
    assert "stay dense" in plan.format_reason
    out = moecompose.build(plan, tmp_path / "n").path
    assert (our_logits(out) - hf_logits(sources["seed"])).abs().max().item() <= 1e-5


def test_drop_upcycling_redraws_the_same_neurons_in_gate_up_and_down(write_spec, tmp_path, sources) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {base: $seed}
        seed: 7
        layers:
          - select: [1]
            ffn:
              experts: {copy: base, count: 3, drop: 0.5}
        output: {format: native}
        """
    )
    plan = moecompose.plan(spec)
    out = moecompose.build(plan, tmp_path / "d").path
    built, dense = weights(out), weights(sources["seed"])
    f = dense["model.layers.1.mlp.gate_proj.weight"].shape[0]
    for j in range(3):
        changed = {}
        for proj, dim in (("gate", 0), ("up", 0), ("down", 1)):
            new = built[f"model.layers.1.mlp.experts.{proj}_proj"][j]
            old = dense[f"model.layers.1.mlp.{proj}_proj.weight"]
            diff = (new != old).any(dim=1 - dim)
            changed[proj] = diff.nonzero().flatten()
        assert torch.equal(changed["gate"], changed["up"])
        assert torch.equal(changed["gate"], changed["down"])
        assert len(changed["gate"]) == round(0.5 * f)
        recipe = next(t for t in plan.tensors if t.name.endswith("layers.1.mlp.experts.gate_proj")).recipe
        seed = recipe.parts[j].args["neuron_seed"]
        assert torch.equal(changed["gate"], torch.from_numpy(drop_indices(f, 0.5, seed)))
    experts = built["model.layers.1.mlp.experts.gate_proj"]
    assert not torch.equal(experts[0], experts[1]), "experts must differ after drop-upcycling"


def test_bf16_sources_sharded_output_loads_in_transformers(tmp_path, write_spec) -> None:
    from moecompose.testing import make_dense

    a = make_dense(tmp_path / "a", seed=11, dtype=torch.bfloat16, max_shard_size="100KB")
    b = make_dense(tmp_path / "b", seed=12, base_seed=11, dtype=torch.bfloat16)
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{a: {a}, b: {b}}}
        layers:
          - select: all
            ffn:
              experts: [a, b]
              router: {{kind: topk, k: 1}}
        output: {{max_shard_size: 200KB}}
        """
    )
    out = moecompose.build(spec, tmp_path / "sharded").path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())
    ref = hf_logits(out, "MixtralForCausalLM")
    ours = our_logits(out)
    assert (ours.float() - ref.float()).abs().max().item() <= 1e-2


@pytest.mark.parametrize("merge", ["average", "{weights: {a: 3, b: 1}}"])
def test_bf16_merges_are_float32_arithmetic_rounded_once(tmp_path, write_spec, merge) -> None:
    """Merged tensors of bf16 sources are the float32 mean (or weighted sum) of the
    widened values, rounded to bf16 once: bit for bit what torch computes."""
    from moecompose.testing import make_dense

    a = make_dense(tmp_path / "a", seed=11, dtype=torch.bfloat16)
    b = make_dense(tmp_path / "b", seed=12, base_seed=11, dtype=torch.bfloat16)
    spec = write_spec(f"moecompose: 1\nsources: {{a: {a}, b: {b}}}\nmerge: {merge}\n"
                      "layers:\n  - select: all\n    ffn: {experts: [a, b]}\n")
    built = weights(moecompose.build(spec, tmp_path / "out").path)
    wa, wb = weights(a), weights(b)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.norm.weight"):
        x, y = wa[name].float(), wb[name].float()
        expected = (x + y) / 2 if merge == "average" else x * 0.75 + y * 0.25
        assert built[name].dtype == torch.bfloat16
        assert torch.equal(built[name], expected.to(torch.bfloat16)), name
