"""Output formats as data: how each one names MoE tensors, what it can express, and its
config.json. ``native`` expresses everything; Hugging Face formats only some models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moecompose.errors import SourceError
from moecompose.model.config import (
    ConfigError,
    DenseFFNConfig,
    LayerConfig,
    ModelConfig,
    MoEFFNConfig,
    TopKRouterConfig,
)
from moecompose.sources.checkpoint import ArchFacts
from moecompose.text import ranges

# The few native names that differ from the sources' Llama names (docs/artifact-format.md).
NATIVE_MOE = {
    "router": "model.layers.{i}.mlp.router.weight",
    "experts_gate": "model.layers.{i}.mlp.experts.gate_proj",
    "experts_up": "model.layers.{i}.mlp.experts.up_proj",
    "experts_down": "model.layers.{i}.mlp.experts.down_proj",
    "shared_gate_proj": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "shared_up_proj": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "shared_down_proj": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "model.layers.{i}.mlp.shared_expert_gate.weight",
}


@dataclass(frozen=True)
class Layout:
    """How one output format stores an MoE layer.

    ``stacked``: experts as one ``[E, ...]`` tensor per projection (names without ``{j}``);
    otherwise one tensor per expert (names with ``{j}``).
    """

    name: str
    stacked: bool
    router: str
    expert: dict[str, str]  # gate / up / down -> name
    shared: dict[str, str]  # gate / up / down -> name
    shared_expert_gate: str | None  # the shared expert is gated by sigmoid(x . g)


LAYOUTS: dict[str, Layout] = {
    "native": Layout(
        "native",
        stacked=True,
        router=NATIVE_MOE["router"],
        expert={"gate": NATIVE_MOE["experts_gate"], "up": NATIVE_MOE["experts_up"],
                "down": NATIVE_MOE["experts_down"]},
        shared={"gate": NATIVE_MOE["shared_gate_proj"], "up": NATIVE_MOE["shared_up_proj"],
                "down": NATIVE_MOE["shared_down_proj"]},
        shared_expert_gate=None,
    ),
    "mixtral": Layout(
        "mixtral",
        stacked=False,
        router="model.layers.{i}.block_sparse_moe.gate.weight",
        expert={"gate": "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
                "up": "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
                "down": "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight"},
        shared={},
        shared_expert_gate=None,
    ),
    "qwen2_moe": Layout(
        "qwen2_moe",
        stacked=False,
        router="model.layers.{i}.mlp.gate.weight",
        expert={"gate": "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
                "up": "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
                "down": "model.layers.{i}.mlp.experts.{j}.down_proj.weight"},
        shared={"gate": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
                "up": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
                "down": "model.layers.{i}.mlp.shared_expert.down_proj.weight"},
        shared_expert_gate="model.layers.{i}.mlp.shared_expert_gate.weight",
    ),
}


@dataclass(frozen=True)
class MoEShape:
    """What a format needs to know about the model's MoE layers."""

    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    num_experts: frozenset[int]
    top_k: frozenset[int]
    normalize: frozenset[bool]
    shared: frozenset[bool]  # per MoE layer: has a shared expert
    unexpressible: frozenset[str]  # expert/router kinds only the native format has
    attention_layers: tuple[int, ...]  # layers with attention experts
    block: str


def blockers(fmt: str, arch: ArchFacts, moe: MoEShape, *, asked: bool = False) -> list[str]:
    """Why ``fmt`` cannot express the model exactly; empty when it can.

    A Nexus router's expert embeddings do not depend on the input, so at build time it is
    a linear gate: Qwen2-MoE expresses it when ``asked`` for by name (the projection that
    training and ``moecompose extend`` need is then baked in; ``auto`` keeps it native).
    """
    if fmt == "native":
        return []
    out: list[str] = []
    for kind in sorted(moe.unexpressible):
        if kind == "nexus" and fmt == "qwen2_moe" and asked:
            continue
        out.append({"adapters": "adapter experts", "token_mixing": "token mixing",
                    "nexus": "the nexus router (format: qwen2_moe bakes it into a linear gate)",
                    }.get(kind, kind))
    if moe.attention_layers:
        out.append(f"attention experts (layers {ranges(moe.attention_layers)})")
    if moe.block != "sequential":
        out.append(f"block: {moe.block}")
    if not moe.moe_layers:
        out.append("no layer is MoE")
    if len(moe.num_experts) > 1:
        out.append("MoE layers have different expert counts")
    if len(moe.top_k) > 1:
        out.append("MoE layers have different k")
    if fmt == "mixtral":
        if moe.dense_layers:
            out.append(f"layers {ranges(moe.dense_layers)} stay dense (Mixtral makes every layer MoE)")
        if True in moe.shared:
            out.append("a shared expert (Mixtral has none)")
        if False in moe.normalize:
            out.append("router.normalize: false (Mixtral renormalises the top-k weights)")
        if arch.attention_bias:
            out.append("q/k/v biases (Mixtral attention has none)")
    elif fmt == "qwen2_moe":
        if arch.sliding_window is not None:
            out.append(
                f"sliding-window attention (window {arch.sliding_window}; Qwen2-MoE windows "
                "only some layers)"
            )
        if False in moe.shared:
            out.append("MoE layers without a shared expert (Qwen2-MoE always has one)")
        if len(moe.normalize) > 1:
            out.append("MoE layers differ in router.normalize")
    return out


HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "max_position_embeddings", "sliding_window", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
"""Fields of the native config that Hugging Face configs have too, with the same meaning."""


def model_config(
    arch: ArchFacts,
    family: str,
    layers: Sequence[LayerConfig],
    *,
    block: str = "sequential",
    dtype: str = "float32",
    trainable: Sequence[str] | None = None,
    where: str,
) -> ModelConfig:
    """The native config of a model with the widths of ``arch`` and these ``layers`` (a
    dense source is the one whose layers are all dense). A fact of the source that the
    model cannot run is a ``SourceError`` about ``where``, the source."""
    try:
        return ModelConfig.from_dict({
            "family": family,
            "vocab_size": arch.vocab_size,
            "hidden_size": arch.hidden_size,
            "num_attention_heads": arch.num_attention_heads,
            "num_key_value_heads": arch.num_key_value_heads,
            "head_dim": arch.head_dim,
            "hidden_act": arch.hidden_act,
            "rms_norm_eps": arch.rms_norm_eps,
            "rope_theta": arch.rope_theta,
            "rope_scaling": arch.rope_scaling,
            "max_position_embeddings": arch.max_position_embeddings,
            "sliding_window": arch.sliding_window,
            "tie_word_embeddings": arch.tie_word_embeddings,
            "bos_token_id": arch.bos_token_id,
            "eos_token_id": arch.eos_token_id,
            "pad_token_id": arch.pad_token_id,
            "intermediate_size": arch.intermediate_size,
            "attention_bias": arch.attention_bias,
            "block": block,
            "dtype": dtype,
            "layers": tuple(layers),
            "trainable": trainable,
        })
    except ConfigError as exc:
        raise SourceError(f"{where}: config.json describes no model moecompose can run: {exc}") from None


def hf_config(fmt: str, native: ModelConfig, initializer_range: float) -> dict[str, Any]:
    """config.json for ``fmt``. Hugging Face configs carry the native one under
    ``moecompose`` so that ``moecompose.load`` restores what HF has no field for."""
    data = native.to_dict()
    if fmt == "native":
        return data
    dense = [i for i, layer in enumerate(native.layers) if isinstance(layer.ffn, DenseFFNConfig)]
    moe = [layer.ffn for layer in native.layers if isinstance(layer.ffn, MoEFFNConfig)]
    first, router = moe[0], moe[0].router
    assert isinstance(router, TopKRouterConfig)  # blockers() refuses the other kinds
    cfg = {
        **{key: data[key] for key in HF_FIELDS},
        "initializer_range": initializer_range,
        "dtype": native.dtype,
    }
    load_balance = max(ffn.aux_loss.load_balance for ffn in moe)
    if fmt == "mixtral":
        cfg = {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **cfg,
            "intermediate_size": first.intermediate_size,
            "num_local_experts": first.num_experts,
            "num_experts_per_tok": router.k,
            "router_aux_loss_coef": load_balance,
            "output_router_logits": False,
        }
    else:
        assert first.shared_expert is not None  # blockers() refuses MoE layers without one
        cfg = {
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            **cfg,
            "intermediate_size": native.intermediate_size,
            "moe_intermediate_size": first.intermediate_size,
            "shared_expert_intermediate_size": first.shared_expert.intermediate_size,
            "num_experts": first.num_experts,
            "num_experts_per_tok": router.k,
            "norm_topk_prob": router.normalize,
            "decoder_sparse_step": 1,
            "mlp_only_layers": dense,
            "qkv_bias": native.attention_bias,
            "use_sliding_window": False,
            "router_aux_loss_coef": load_balance,
            "output_router_logits": False,
        }
    cfg["moecompose"] = data
    return cfg
