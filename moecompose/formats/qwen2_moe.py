"""Qwen2-MoE (``Qwen2MoeForCausalLM``): one tensor per expert, a shared expert in every
MoE layer scaled by ``sigmoid(x . g)`` (its gate), dense layers listed in
``mlp_only_layers``, no sliding window."""

from __future__ import annotations

from typing import Any

from moecompose import formats as f
from moecompose.model.config import ModelConfig
from moecompose.sources.checkpoint import ArchFacts

LAYOUT = f.Layout.of("model.layers.{i}.mlp", router="gate.weight",
                     experts="experts.{j}.{name}.weight",
                     projections=("gate_proj", "up_proj", "down_proj"),
                     shared="shared_expert.{name}.weight", shared_gate="shared_expert_gate.weight")


def blockers(arch: ArchFacts, moe: f.MoEShape, *, asked: bool) -> list[str]:
    """A Nexus router's expert embeddings do not depend on the input, so at build time it
    is a linear gate: Qwen2-MoE expresses it when ``asked`` for by name (the projection
    that training and ``moecompose extend`` need is then baked in; ``auto`` keeps it
    native)."""
    out = f.hf_blockers(moe, bakes_nexus=asked)
    if arch.sliding_window is not None:
        out.append(
            f"sliding-window attention (window {arch.sliding_window}; Qwen2-MoE windows "
            "only some layers)"
        )
    out += f.block_blockers(arch)
    if False in moe.shared:
        out.append("MoE layers without a shared expert (Qwen2-MoE always has one)")
    if len(moe.normalize) > 1:
        out.append("MoE layers differ in router.normalize")
    return out


def write_config(native_config: ModelConfig, initializer_range: float) -> dict[str, Any]:
    moe, _ = f.moe_ffns(native_config)
    shared = moe[0].shared_expert
    assert shared is not None  # blockers() refuses MoE layers without one
    return f.hf_config(
        native_config, initializer_range,
        architecture="Qwen2MoeForCausalLM",
        model_type="qwen2_moe",
        **f.qwen_moe_fields(native_config),
        shared_expert_intermediate_size=shared.intermediate_size,
        qkv_bias=native_config.attention_bias,
    )


FORMAT = f.Format(name="qwen2_moe", model_type="qwen2_moe", auto=2, gates_shared_expert=True,
                  layout=LAYOUT, blockers=blockers, write_config=write_config)
