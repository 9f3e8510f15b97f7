"""Output formats, one module each: how a format names the MoE tensors, what it cannot
express, its ``config.json``, and how its artifacts read back into native names.

Every module of this package is a format: it defines ``FORMAT``, a :class:`Format`
named like the module, and the registry finds it (``pkgutil``), so adding a format is
adding a file. Nothing here imports torch; a reader that stacks tensors imports it when
it runs.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from moecompose.model.config import ModelConfig, MoEFFNConfig, TopKRouterConfig
from moecompose.sources.checkpoint import ArchFacts
from moecompose.text import ranges

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How a format stores an MoE layer; names hold ``{i}`` (layer) and ``{j}`` (expert).

    ``stacked``: experts as one ``[E, ...]`` tensor per projection (names without ``{j}``);
    otherwise one tensor per expert (names with ``{j}``).
    """

    stacked: bool
    router: str
    expert: dict[str, str]  # gate / up / down -> name
    shared: dict[str, str]  # gate / up / down -> name; empty: no shared expert
    shared_expert_gate: str | None  # g of a shared expert scaled by sigmoid(x . g)

    @classmethod
    def of(cls, block: str, *, router: str, experts: str, projections: tuple[str, str, str],
           shared: str | None = None, shared_gate: str | None = None) -> Layout:
        """The layout of an MoE block named ``block`` (``{i}``: the layer): the router,
        ``experts`` (with ``{name}``, a projection's name in ``projections`` for gate, up
        and down; with ``{j}`` when stored one tensor per expert), and the shared expert
        (``{name}`` too) and its gate, all under ``block``."""

        def names(pattern: str) -> dict[str, str]:
            return {role: f"{block}.{pattern}".replace("{name}", name)
                    for role, name in zip(("gate", "up", "down"), projections)}

        return cls(
            stacked="{j}" not in experts,
            router=f"{block}.{router}",
            expert=names(experts),
            shared={} if shared is None else names(shared),
            shared_expert_gate=None if shared_gate is None else f"{block}.{shared_gate}",
        )


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


class Blockers(Protocol):
    def __call__(self, arch: ArchFacts, moe: MoEShape, *, asked: bool) -> list[str]:
        """Why the format cannot express the model exactly, one reason each (shown to
        users); empty when it can. ``asked``: named in the spec, not tried by ``auto``."""
        ...


@dataclass(frozen=True)
class Format:
    """One output format. ``name`` is the module's name, ``output.format`` and ``plan.format``.

    ``write_config`` gives ``config.json`` from the native config (and the sources'
    ``initializer_range``); ``read_config`` gives back the native config from that
    ``config.json`` (``None`` when it lacks one), by default the native config a Hugging
    Face export embeds; ``files`` gives more files the artifact holds (name -> text: the
    native format's remote code for transformers). :meth:`read_tensors` and
    ``moecompose.load`` (which reads the files straight into the stacked tensors) follow
    one table, ``native.stored_names`` of ``layout``.
    """

    name: str
    model_type: str  # config.json's "model_type"
    auto: int | None  # the order in which ``format: auto`` tries it; None: not tried
    gates_shared_expert: bool  # a planned shared expert is scaled by sigmoid(x . g)
    layout: Layout
    blockers: Blockers
    write_config: Callable[[ModelConfig, float], dict[str, Any]]
    read_config: Callable[[dict[str, Any]], dict[str, Any] | None] = field(
        default=lambda data: embedded_native(data))
    files: Callable[[], dict[str, str]] = field(default=lambda: {})  # more files to write

    def read_tensors(self, native_config: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The format's tensors, held in memory, renamed (and per-expert ones stacked)
        into native names for ``native_config``."""
        from moecompose.formats.native import from_layout

        return from_layout(self.layout, native_config, tensors)


@functools.cache
def registry() -> dict[str, Format]:
    """Every format of this package by name: native first, then in ``auto`` order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        fmt = getattr(module, "FORMAT", None)
        if not isinstance(fmt, Format) or fmt.name != info.name:
            raise TypeError(f"{module.__file__} defines no FORMAT named '{info.name}'")
        found.append(fmt)
    found.sort(key=lambda f: (f.auto is not None, f.auto or 0, f.name))
    return {f.name: f for f in found}


def get(name: str) -> Format:
    return registry()[name]


def names() -> tuple[str, ...]:
    """Names for ``output.format``, in registry order."""
    return tuple(registry())


def tried_by_auto() -> list[Format]:
    """The formats ``format: auto`` tries, in order, before it falls back to native."""
    return [f for f in registry().values() if f.auto is not None]


def by_model_type(model_type: object) -> Format | None:
    """The format whose ``config.json`` has this ``model_type``."""
    return next((f for f in registry().values() if f.model_type == model_type), None)


# -- shared by the Hugging Face formats

HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "max_position_embeddings", "sliding_window", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
"""Fields of the native config that Hugging Face configs have too, with the same meaning."""

_KINDS = {"adapters": "adapter experts", "token_mixing": "token mixing",
          "nexus": "the nexus router (format: qwen2_moe bakes it into a linear gate)"}


def hf_blockers(moe: MoEShape, *, bakes_nexus: bool) -> list[str]:
    """What no Hugging Face MoE format expresses: expert kinds other than top-k SwiGLU
    experts (a nexus router only where ``bakes_nexus``), attention experts, a parallel
    block, no MoE layer, and MoE layers that differ in expert count or k."""
    out = [_KINDS.get(kind, kind) for kind in sorted(moe.unexpressible)
           if not (kind == "nexus" and bakes_nexus)]
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
    return out


def block_blockers(arch: ArchFacts, *, head_qk_norm: bool = False) -> list[str]:
    """What Llama-style decoder blocks cannot hold: q/k norms (per head, unless
    ``head_qk_norm``: the format has Qwen3's), norms after each branch (OLMo 2), and what
    Gemma adds to the block (GeGLU FFNs, (1+w) norms, scaled embeddings, scores scaled
    other than by head_dim, soft-capping, local layers)."""
    out = []
    if arch.qk_norm == "head" and not head_qk_norm:
        out.append("per-head q/k norms (Qwen3 attention: format qwen3_moe has them)")
    if arch.qk_norm == "full":
        out.append("q/k norms over all heads (OLMo 2 attention)")
    if arch.norm_placement == "post":
        out.append("norms after the attention and FFN branches (OLMo 2's block)")
    if arch.norm_placement == "sandwich":
        out.append("norms before and after the attention and FFN branches (Gemma's block)")
    gemma = (
        (arch.hidden_act != "silu", f"{arch.hidden_act} experts (the format's are SwiGLU)"),
        (arch.norm_unit_offset, "(1+w) norms (Gemma's RMSNorm)"),
        (arch.scale_embeddings, "scaled embeddings (x sqrt(hidden_size))"),
        (arch.query_pre_attn_scalar not in (None, arch.head_dim),
         f"attention scores scaled by query_pre_attn_scalar {arch.query_pre_attn_scalar}"),
        (arch.attn_logit_softcapping is not None, "attention logit soft-capping"),
        (arch.final_logit_softcapping is not None, "final logit soft-capping"),
        (arch.layer_types is not None and arch.sliding_window is not None,
         "a sliding window on some layers only (layer_types)"),
        (arch.rope_local_base_freq is not None,
         "a rope of their own on sliding-window layers (rope_local_base_freq)"),
    )
    return out + [reason for blocked, reason in gemma if blocked]


def moe_ffns(native_config: ModelConfig) -> tuple[list[MoEFFNConfig], TopKRouterConfig]:
    """The MoE FFNs of a model a Hugging Face format expresses, and the first one's router
    (the blockers make every MoE layer alike and refuse other router kinds)."""
    moe = [layer.ffn for layer in native_config.layers if isinstance(layer.ffn, MoEFFNConfig)]
    router = moe[0].router
    assert isinstance(router, TopKRouterConfig)
    return moe, router


def hf_config(native_config: ModelConfig, initializer_range: float, *, architecture: str,
              model_type: str, **fields: Any) -> dict[str, Any]:
    """A Hugging Face config.json: the fields it shares with the native config, the
    format's own ``fields``, and the native config under ``moecompose``, so that
    ``moecompose.load`` restores what the format has no field for."""
    data = native_config.to_dict()
    moe, _ = moe_ffns(native_config)
    return {
        "architectures": [architecture],
        "model_type": model_type,
        **{key: data[key] for key in HF_FIELDS},
        "initializer_range": initializer_range,
        "dtype": native_config.dtype,
        **fields,
        # transformers adds coef * its load-balancing loss to the loss when it outputs the
        # router logits: on whenever the spec balances (its loss differs from ours:
        # docs/training.md, "Aux losses in transformers").
        "router_aux_loss_coef": max(ffn.aux_loss.load_balance for ffn in moe),
        "output_router_logits": any(ffn.aux_loss.load_balance > 0 for ffn in moe),
        "moecompose": data,
    }


def qwen_moe_fields(native_config: ModelConfig) -> dict[str, Any]:
    """The MoE fields Qwen2-MoE and Qwen3-MoE configs share: expert widths and counts, k,
    renormalisation, and the dense layers (``mlp_only_layers``); every layer may be MoE."""
    moe, router = moe_ffns(native_config)
    return {
        "intermediate_size": native_config.intermediate_size,
        "moe_intermediate_size": moe[0].intermediate_size,
        "num_experts": moe[0].num_experts,
        "num_experts_per_tok": router.k,
        "norm_topk_prob": router.normalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, layer in enumerate(native_config.layers)
                            if not isinstance(layer.ffn, MoEFFNConfig)],
        "use_sliding_window": False,
    }


def embedded_native(data: dict[str, Any]) -> dict[str, Any] | None:
    """The native config a Hugging Face export carries under ``moecompose``."""
    native = data.get("moecompose")
    return native if isinstance(native, dict) else None
