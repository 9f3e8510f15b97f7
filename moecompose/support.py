"""What moecompose supports, from its own tables: source families (``sources.families``) ×
methods × output formats (``formats``). ``docs/families.md`` holds :func:`support_table`'s
output; a test fails when it is stale."""

from __future__ import annotations

import dataclasses

from moecompose import formats
from moecompose.formats import MoEShape
from moecompose.sources.checkpoint import ACTIVATIONS, ArchFacts
from moecompose.sources.families import FAMILIES, Family

METHODS = ("sparse upcycling", "BTX", "BAM", "Nexus", "PESC", "Mixture of Tokens", "granularity")
_GEMMA_LAYERS = ("sliding_attention", "full_attention")
_TYPICAL: dict[str, dict[str, object]] = {  # what a family's usual checkpoints set
    "mistral": {"sliding_window": 4096},
    "gemma2": {"sliding_window": 4096, "layer_types": _GEMMA_LAYERS,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"sliding_window": 1024, "layer_types": _GEMMA_LAYERS,
               "rope_local_base_freq": 10000.0},
}


def _facts(family: Family) -> ArchFacts:
    """A typical checkpoint of ``family``, as far as formats look at it."""
    values: dict[str, object] = {f.name: 0 for f in dataclasses.fields(ArchFacts)
                                 if f.default is dataclasses.MISSING}
    values.update(model_type=family.model_types[0], hidden_act=ACTIVATIONS[family.act_default],
                  rope_scaling=None, tie_word_embeddings=False,
                  attention_bias=family.qkv_bias_default, qk_norm=family.qk_norm,
                  norm_placement=family.norm_placement, sliding_window=None,
                  norm_unit_offset=family.norm_unit_offset,
                  scale_embeddings=family.scale_embeddings,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    values.update(_TYPICAL.get(family.name, {}))
    return ArchFacts(**values)  # type: ignore[arg-type]


def _moe(shared: bool) -> MoEShape:
    return MoEShape(moe_layers=(0, 1), dense_layers=(), num_experts=frozenset({8}),
                    top_k=frozenset({2}), normalize=frozenset({True}),
                    shared=frozenset({shared}), unexpressible=frozenset(), attention_layers=(),
                    block="sequential")


def methods(family: Family) -> tuple[str, ...]:
    """The methods that build from ``family``'s checkpoints (attention experts need
    attention without per-head q/k norms)."""
    return tuple(m for m in METHODS if not (m == "BAM" and family.qk_norm))


def expressible(family: Family, *, shared: bool) -> tuple[str, ...]:
    """The formats that hold every-layer top-2 MoE of ``family`` (with a shared expert or
    not); native holds every model."""
    facts = _facts(family)
    return tuple(f.name for f in formats.registry().values()
                 if not f.blockers(facts, _moe(shared), asked=True))


def support_table() -> str:
    lines = [
        "| family | model_type | methods | formats: top-k MoE | formats: with a shared expert |",
        "|---|---|---|---|---|",
    ]
    for family in FAMILIES.values():
        lines.append(
            f"| {family.name} | {', '.join(family.model_types)} | {', '.join(methods(family))} "
            f"| {', '.join(expressible(family, shared=False))} "
            f"| {', '.join(expressible(family, shared=True))} |"
        )
    return "\n".join(lines) + "\n"
