"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 attention (per-head q/k norms, explicit
``head_dim``), one tensor per expert, top-k routing (``norm_topk_prob``: renormalised or
not), no shared expert, dense layers listed in ``mlp_only_layers``, no sliding window."""

from __future__ import annotations

from typing import Any

from moecompose import formats as f
from moecompose.model.config import ModelConfig
from moecompose.sources.checkpoint import ArchFacts

LAYOUT = f.Layout.of("model.layers.{i}.mlp", router="gate.weight",
                     experts="experts.{j}.{name}.weight",
                     projections=("gate_proj", "up_proj", "down_proj"))


def blockers(arch: ArchFacts, moe: f.MoEShape, *, asked: bool) -> list[str]:
    own = (
        (arch.qk_norm is None, "sources without q/k norms (Qwen3-MoE attention always has them)"),
        (arch.sliding_window is not None, f"sliding-window attention (window {arch.sliding_window})"),
        (True in moe.shared, "a shared expert (Qwen3-MoE has none)"),
        (len(moe.normalize) > 1, "MoE layers differ in router.normalize"),
    )
    return [*f.hf_blockers(moe, bakes_nexus=False), *f.block_blockers(arch, head_qk_norm=True),
            *(reason for blocked, reason in own if blocked)]


def write_config(native_config: ModelConfig, initializer_range: float) -> dict[str, Any]:
    return f.hf_config(native_config, initializer_range, architecture="Qwen3MoeForCausalLM",
                       model_type="qwen3_moe", **f.qwen_moe_fields(native_config),
                       attention_bias=native_config.attention_bias)


FORMAT = f.Format(name="qwen3_moe", model_type="qwen3_moe", auto=3, gates_shared_expert=False,
                  layout=LAYOUT, blockers=blockers, write_config=write_config)
