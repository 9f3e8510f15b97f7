"""BAM end to end: attention experts built from real checkpoints, checked against transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, hf_logits, our_logits, weights

import moecompose

pytestmark = pytest.mark.slow

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("family", ["seed", "qwen_seed"])
@pytest.mark.parametrize("share", ["[]", "[k, v]"])
@pytest.mark.parametrize("router", ["{kind: soft}", "{kind: topk, k: 1}"])
def test_identical_attention_experts_reproduce_dense_logits(write_spec, tmp_path, sources, family, share, router) -> None:
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{base: ${family}}}
        layers:
          - select: all
            attention:
              experts: [base, base, base]
              share: {share}
              router: {router}
        """
    )
    plan = moecompose.plan(spec)
    assert plan.format == "native" and "attention experts" in plan.format_reason
    out = moecompose.build(plan, tmp_path / "bam").path
    assert (our_logits(out) - hf_logits(sources[family])).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["", "qwen_"])
def test_attention_experts_are_the_sources_tensors_and_shared_kv_their_merge(write_spec, tmp_path, sources, family) -> None:
    names = ("seed", "code", "law")
    srcs = ", ".join(f"{n}: ${family}{n}" for n in names)
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{{srcs}}}
        block: parallel
        layers:
          - select: {{from: 1, to: 4}}
            attention:
              experts: [seed, code, law]
              share: [k, v]
            ffn:
              experts: [seed, code, law]
              router: {{kind: topk, k: 1}}
        """
    )
    out = moecompose.build(spec, tmp_path / "bam").path
    built = weights(out)
    src = [weights(sources[f"{family}{n}"]) for n in names]
    for i in (1, 3):
        prefix = f"model.layers.{i}.self_attn"
        for proj in ("q_proj", "o_proj"):
            stacked = built[f"{prefix}.experts.{proj}"]
            for j in range(3):
                assert torch.equal(stacked[j], src[j][f"{prefix}.{proj}.weight"])
        for proj in ("k_proj", "v_proj"):
            name = f"{prefix}.{proj}.weight"
            assert torch.equal(built[name], (src[0][name] + src[1][name] + src[2][name]) / 3)
        if family:
            stacked = built[f"{prefix}.experts.q_bias"]
            for j in range(3):
                assert torch.equal(stacked[j], src[j][f"{prefix}.q_proj.bias"])
    assert "model.layers.0.self_attn.q_proj.weight" in built  # layer 0 keeps ordinary attention
    model = moecompose.load(out)
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all()


def test_expert_kv_stacks_every_projection(write_spec, tmp_path, sources) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {seed: $seed, code: $code}
        layers:
          - select: [2]
            attention: {experts: [code, seed]}
        """
    )
    out = moecompose.build(spec, tmp_path / "ekv").path
    built, seed, code = weights(out), weights(sources["seed"]), weights(sources["code"])
    for proj in ATTN:
        stacked = built[f"model.layers.2.self_attn.experts.{proj}"]
        assert torch.equal(stacked[0], code[f"model.layers.2.self_attn.{proj}.weight"])
        assert torch.equal(stacked[1], seed[f"model.layers.2.self_attn.{proj}.weight"])
    plan = moecompose.plan(spec)
    kv_row = 2 * 2 * 16 * 4  # k and v, 2 kv heads x 16 dims, float32
    assert plan.totals.kv_cache_bytes_per_token == kv_row * (3 + 2)
