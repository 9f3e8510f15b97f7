"""Architecture families as data: which checkpoint tensor plays which role, and how to
read a family's config. Adding a family is adding an entry to ``FAMILIES``."""

from __future__ import annotations

from dataclasses import dataclass, field

# Roles of tensors outside the decoder layers.
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")
# Roles inside decoder layer {i}; "*_bias" roles exist only when the family has qkv biases.
LAYER_ROLES = (
    "attn_norm", "attn_out_norm", "ffn_norm", "ffn_out_norm", "q", "k", "v", "o", "q_bias",
    "k_bias", "v_bias", "q_norm", "k_norm", "ffn_gate", "ffn_up", "ffn_down",
)
QK_NORM_ROLES = ("q_norm", "k_norm")  # RMSNorm of queries and keys (Qwen3, OLMo 2, Gemma 3)
# RMSNorms of each branch's output, in blocks that also normalise its input (Gemma).
OUT_NORM_ROLES = ("attn_out_norm", "ffn_out_norm")

LLAMA_NAMES: dict[str, str] = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{i}.mlp.down_proj.weight",
}

# Gemma 2 and 3: four norms per layer ("sandwich" placement).
GEMMA_NAMES: dict[str, str] = {
    **LLAMA_NAMES,
    "attn_out_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "ffn_out_norm": "model.layers.{i}.post_feedforward_layernorm.weight",
}


@dataclass(frozen=True)
class Family:
    """A family of dense decoder-only checkpoints with one tensor layout."""

    name: str
    model_types: tuple[str, ...]
    names: dict[str, str]
    # Config key saying whether q/k/v have biases, or a fixed answer for the family.
    qkv_bias_key: str | None = "attention_bias"
    qkv_bias_default: bool = False
    # Config keys that must be off (name -> the value meaning "off").
    must_be: dict[str, object] = field(default_factory=dict)
    # Queries and keys pass an RMSNorm before rope: "head" (per head, weights [head_dim]:
    # Qwen3) or "full" (over all heads, weights [heads * head_dim]: OLMo 2); None: none.
    qk_norm: str | None = None
    # "pre": each branch normalises its input (Llama); "post": its output, before the
    # residual sum (OLMo 2). `attn_norm`/`ffn_norm` name the attention/FFN branch's norm.
    # "sandwich": both (Gemma); `attn_out_norm`/`ffn_out_norm` name the output norms.
    norm_placement: str = "pre"
    # RMSNorm weights are stored as offsets from 1: the norm scales by (1 + w), in fp32
    # before the cast back (Gemma).
    norm_unit_offset: bool = False
    # The token embeddings are multiplied by sqrt(hidden_size) (Gemma).
    scale_embeddings: bool = False
    # The config key naming the FFN's gate activation, and its value when absent.
    act_key: str = "hidden_act"
    act_default: str = "silu"
    # Whether the config's tie_word_embeddings defaults to true (Gemma).
    tie_default: bool = False
    # Per-layer windows: a window applies only with this config key true (Qwen2, Qwen3).
    window_switch: str | None = None
    # Per-layer attention kinds (Gemma): `layer_types` ("sliding_attention" layers use the
    # window, "full_attention" ones do not) or, in older configs, `sliding_window_pattern`
    # P (every P-th layer full); P is this value when the config gives neither. None: the
    # family has one kind of attention in every layer.
    window_pattern: int | None = None
    # The config key of a separate rope base for sliding-window layers, which use it
    # unscaled (Gemma 3; transformers 5 writes it as rope_parameters.sliding_attention).
    local_rope_key: str | None = None
    # Tensors stored fused, by name ({i}: the layer) -> the roles their rows hold, in order
    # (Phi-3's qkv_proj and gate_up_proj). They are read as one tensor per role, named as
    # `names` says: a range of rows is a range of bytes, so nothing is copied.
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def tensor(self, role: str, layer: int | None = None) -> str:
        name = self.names[role]
        return name.format(i=layer) if layer is not None else name


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama", ("llama",), LLAMA_NAMES, qkv_bias_key=None,
        must_be={"mlp_bias": False, "attention_bias": False},
    ),
    "mistral": Family("mistral", ("mistral",), LLAMA_NAMES),
    "qwen2": Family("qwen2", ("qwen2",), LLAMA_NAMES, qkv_bias_key=None, qkv_bias_default=True,
                    window_switch="use_sliding_window"),
    "qwen3": Family("qwen3", ("qwen3",), LLAMA_NAMES, qk_norm="head",
                    window_switch="use_sliding_window"),
    "phi3": Family(
        "phi3", ("phi3",), LLAMA_NAMES, qkv_bias_key=None,
        fused={"model.layers.{i}.self_attn.qkv_proj.weight": ("q", "k", "v"),
               "model.layers.{i}.mlp.gate_up_proj.weight": ("ffn_gate", "ffn_up")},
    ),
    "olmo2": Family(
        "olmo2", ("olmo2",),
        {**LLAMA_NAMES, "attn_norm": "model.layers.{i}.post_attention_layernorm.weight",
         "ffn_norm": "model.layers.{i}.post_feedforward_layernorm.weight"},
        qk_norm="full", norm_placement="post",
    ),
    "gemma2": Family(
        "gemma2", ("gemma2",), GEMMA_NAMES, qkv_bias_key=None,
        must_be={"attention_bias": False, "use_bidirectional_attention": False},
        norm_placement="sandwich", norm_unit_offset=True, scale_embeddings=True,
        act_key="hidden_activation", act_default="gelu_pytorch_tanh", tie_default=True,
        window_pattern=2,
    ),
    "gemma3": Family(
        "gemma3", ("gemma3_text",), GEMMA_NAMES, qkv_bias_key=None,
        must_be={"attention_bias": False, "use_bidirectional_attention": False},
        qk_norm="head", norm_placement="sandwich", norm_unit_offset=True,
        scale_embeddings=True, act_key="hidden_activation", act_default="gelu_pytorch_tanh",
        tie_default=True, window_pattern=6, local_rope_key="rope_local_base_freq",
    ),
}


def family_for(model_type: str) -> Family | None:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None
