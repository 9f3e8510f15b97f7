"""Mixtral (``MixtralForCausalLM``): every layer MoE, one tensor per expert, top-k
routing that renormalises the k weights, no shared expert, no attention biases."""

from __future__ import annotations

from typing import Any

from moecompose import formats as f
from moecompose.model.config import ModelConfig
from moecompose.sources.checkpoint import ArchFacts
from moecompose.text import ranges

LAYOUT = f.Layout.of("model.layers.{i}.block_sparse_moe", router="gate.weight",
                     experts="experts.{j}.{name}.weight", projections=("w1", "w3", "w2"))


def blockers(arch: ArchFacts, moe: f.MoEShape, *, asked: bool) -> list[str]:
    out = f.hf_blockers(moe, bakes_nexus=False)
    if moe.dense_layers:
        out.append(f"layers {ranges(moe.dense_layers)} stay dense (Mixtral makes every layer MoE)")
    if True in moe.shared:
        out.append("a shared expert (Mixtral has none)")
    if False in moe.normalize:
        out.append("router.normalize: false (Mixtral renormalises the top-k weights)")
    out += f.block_blockers(arch)
    if arch.attention_bias:
        out.append("q/k/v biases (Mixtral attention has none)")
    return out


def write_config(native_config: ModelConfig, initializer_range: float) -> dict[str, Any]:
    moe, router = f.moe_ffns(native_config)
    return f.hf_config(
        native_config, initializer_range,
        architecture="MixtralForCausalLM",
        model_type="mixtral",
        intermediate_size=moe[0].intermediate_size,
        num_local_experts=moe[0].num_experts,
        num_experts_per_tok=router.k,
    )


FORMAT = f.Format(name="mixtral", model_type="mixtral", auto=1, gates_shared_expert=False,
                  layout=LAYOUT, blockers=blockers, write_config=write_config)
