"""The native format (docs/artifact-format.md): expresses every model moecompose makes;
experts stacked, one ``[E, ...]`` tensor per projection; ``config.json`` is the native
config itself. Other formats read back into it with :func:`from_layout`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moecompose.errors import SourceError
from moecompose.formats import Format, Layout, MoEShape
from moecompose.model.config import (
    ConfigError,
    LayerConfig,
    ModelConfig,
    MoEFFNConfig,
    NexusRouterConfig,
)
from moecompose.sources.checkpoint import ArchFacts

if TYPE_CHECKING:
    from torch import Tensor

# The few native names that differ from the sources' Llama names.
LAYOUT = Layout.of("model.layers.{i}.mlp", router="router.weight", experts="experts.{name}",
                   projections=("gate_proj", "up_proj", "down_proj"),
                   shared="shared_expert.{name}.weight", shared_gate="shared_expert_gate.weight")


def blockers(arch: ArchFacts, moe: MoEShape, *, asked: bool) -> list[str]:
    return []


# transformers' Auto classes find the model here with trust_remote_code=True (moecompose.hf;
# `import moecompose` registers the model type, so plain from_pretrained works as well).
AUTO_MAP = {"AutoConfig": "configuration_moecompose.MoeComposeConfig",
            "AutoModelForCausalLM": "modeling_moecompose.MoeComposeForCausalLM"}
REMOTE_CODE = '''"""{what} of a moecompose artifact, for transformers' trust_remote_code=True: the
class is moecompose's own (moecompose.hf), which must be installed."""

try:
    from moecompose.hf import {name}
except ImportError as exc:
    if not (exc.name or "").startswith("moecompose"):
        raise
    raise ImportError("this model needs the moecompose package: pip install '{requirement}'") from None

__all__ = ["{name}"]
'''


def write_config(native_config: ModelConfig, initializer_range: float) -> dict[str, Any]:
    return {**native_config.to_dict(), "auto_map": AUTO_MAP}


def remote_code() -> dict[str, str]:
    """The files ``auto_map`` names (file name -> text): each imports its class from
    moecompose, or says in one line how to install it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("moecompose").split(".")[:2]
        requirement = f"moecompose>={major}.{minor},<{major}.{int(minor) + 1}"
    except (PackageNotFoundError, ValueError):
        requirement = "moecompose"
    out = {}
    for what, target in zip(("The config", "The model"), AUTO_MAP.values()):
        module, name = target.split(".")
        out[f"{module}.py"] = REMOTE_CODE.format(what=what, name=name, requirement=requirement)
    return out


def read_config(data: dict[str, Any]) -> dict[str, Any]:
    return data


def stored_names(layout: Layout, layers: Sequence[LayerConfig]) -> dict[str, str | tuple[str, ...]]:
    """Native name -> the name ``layout`` stores the tensor under, or, for experts stored
    one tensor each, the tuple of their names in expert order (stacked into the native
    ``[E, ...]`` tensor), for every MoE tensor of ``layers``; every other tensor is stored
    under its native name."""
    out: dict[str, str | tuple[str, ...]] = {}
    for i, layer in enumerate(layers):
        ffn = layer.ffn
        if not isinstance(ffn, MoEFFNConfig):
            continue
        if not isinstance(ffn.router, NexusRouterConfig):  # a Nexus router has no weight matrix
            out[LAYOUT.router.format(i=i)] = layout.router.format(i=i)
        for proj, name in layout.expert.items():
            out[LAYOUT.expert[proj].format(i=i)] = (
                name.format(i=i) if layout.stacked
                else tuple(name.format(i=i, j=j) for j in range(ffn.num_experts))
            )
        if ffn.shared_expert is not None:
            for proj, name in layout.shared.items():
                out[LAYOUT.shared[proj].format(i=i)] = name.format(i=i)
            if ffn.shared_expert.gate and layout.shared_expert_gate is not None:
                assert LAYOUT.shared_expert_gate is not None
                out[LAYOUT.shared_expert_gate.format(i=i)] = layout.shared_expert_gate.format(i=i)
    return out


def native_names(layout: Layout, layers: Sequence[LayerConfig], names: Sequence[str]) -> tuple[str, ...]:
    """``names`` of tensors stored in ``layout``, as the native model names them: in
    order, each once (the per-expert tensors of one projection are one native tensor).
    Native names come back unchanged."""
    back = {}
    for target, stored in stored_names(layout, layers).items():
        for name in stored if isinstance(stored, tuple) else (stored,):
            back[name] = target
    return tuple(dict.fromkeys(back.get(name, name) for name in names))


def from_layout(layout: Layout, native_config: ModelConfig,
                tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with the MoE layers stored in ``layout`` renamed into native names,
    per-expert tensors stacked into ``[E, ...]`` in expert order."""
    import torch

    out = dict(tensors)
    for target, stored in stored_names(layout, native_config.layers).items():
        if isinstance(stored, tuple):
            out[target] = torch.stack([out.pop(name) for name in stored])
        else:
            out[target] = out.pop(stored)
    return out


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
            "qk_norm": arch.qk_norm,
            "norm_placement": arch.norm_placement,
            "norm_unit_offset": arch.norm_unit_offset,
            "scale_embeddings": arch.scale_embeddings,
            "query_pre_attn_scalar": arch.query_pre_attn_scalar,
            "attn_logit_softcapping": arch.attn_logit_softcapping,
            "final_logit_softcapping": arch.final_logit_softcapping,
            "layer_types": arch.layer_types,
            "rope_local_base_freq": arch.rope_local_base_freq,
            "block": block,
            "dtype": dtype,
            "layers": tuple(layers),
            "trainable": trainable,
        })
    except ConfigError as exc:
        raise SourceError(f"{where}: config.json describes no model moecompose can run: {exc}") from None


FORMAT = Format(
    name="native",
    model_type="moecompose",
    auto=None,  # not tried: the fallback when no other format fits
    gates_shared_expert=False,
    layout=LAYOUT,
    blockers=blockers,
    write_config=write_config,
    read_config=read_config,
    files=remote_code,
)
