"""Mixtral (``MixtralForCausalLM``): every layer MoE, one tensor per expert, top-k
routing that renormalises the k weights, no shared expert, no attention biases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moecompose.formats import (
    Format,
    Layout,
    MoEShape,
    embedded_native,
    hf_blockers,
    hf_config,
    moe_ffns,
    native,
)
from moecompose.model.config import ModelConfig
from moecompose.sources.checkpoint import ArchFacts
from moecompose.text import ranges

if TYPE_CHECKING:
    from torch import Tensor

LAYOUT = Layout(
    stacked=False,
    router="model.layers.{i}.block_sparse_moe.gate.weight",
    expert={"gate": "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
            "up": "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
            "down": "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight"},
    shared={},
    shared_expert_gate=None,
)


def blockers(arch: ArchFacts, moe: MoEShape, *, asked: bool) -> list[str]:
    out = hf_blockers(moe, bakes_nexus=False)
    if moe.dense_layers:
        out.append(f"layers {ranges(moe.dense_layers)} stay dense (Mixtral makes every layer MoE)")
    if True in moe.shared:
        out.append("a shared expert (Mixtral has none)")
    if False in moe.normalize:
        out.append("router.normalize: false (Mixtral renormalises the top-k weights)")
    if arch.attention_bias:
        out.append("q/k/v biases (Mixtral attention has none)")
    return out


def write_config(native_config: ModelConfig, initializer_range: float) -> dict[str, Any]:
    moe, router = moe_ffns(native_config)
    return hf_config(
        native_config, initializer_range,
        architecture="MixtralForCausalLM",
        model_type="mixtral",
        intermediate_size=moe[0].intermediate_size,
        num_local_experts=moe[0].num_experts,
        num_experts_per_tok=router.k,
    )


def read_tensors(native_config: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return native.from_layout(LAYOUT, native_config, tensors)


FORMAT = Format(
    name="mixtral",
    model_type="mixtral",
    auto=1,
    gates_shared_expert=False,
    layout=LAYOUT,
    blockers=blockers,
    write_config=write_config,
    read_config=embedded_native,
    read_tensors=read_tensors,
)
