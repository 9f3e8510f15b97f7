"""The native model configuration: the `config.json` of a built artifact, as typed values.

Frozen pydantic models, one per part of a layer; parts with variants carry a `kind` that
selects them (a discriminated union), so a kind this version does not know fails at load
time with its name in the message. `to_dict` writes exactly the JSON of
`docs/artifact-format.md`. Every rule a config must follow is checked here, once; an
invalid config raises `ConfigError`, one line naming the field
(`layers[2].ffn.router.k = 5 exceeds num_experts = 4`).

This module imports no torch: the planner builds these models, and the front end runs
without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, NamedTuple, cast, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from typing_extensions import Self

from moecompose.dtypes import MODEL_DTYPES

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A config that breaks a rule; the message is one line that names the field."""


class _Rule(ValueError):
    """Raised by validators: ``field`` (a path below the value being validated, ``""`` for
    the value itself) breaks a rule; ``text`` is written right after the field's path."""

    def __init__(self, field: str, text: str) -> None:
        super().__init__(text)
        self.field, self.text = field, text


# --------------------------------------------------------------------------- scalar values


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Rule("", f" must be a positive integer, got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rule("", f" must be a number, got {value!r}")
    return float(value)


def _non_negative(value: Any) -> float:
    if _number(value) < 0:
        raise _Rule("", f" must be a non-negative number, got {value!r}")
    return float(value)


def _positive(value: Any) -> float:
    if _number(value) <= 0:
        raise _Rule("", f" must be positive, got {value!r}")
    return float(value)


def _fraction(value: Any) -> float:
    if not 0 <= _number(value) < 1:
        raise _Rule("", f" must be in [0, 1), got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Rule("", f" must be true or false, got {value!r}")
    return value


PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
Number = Annotated[float, BeforeValidator(_number)]
NonNegative = Annotated[float, BeforeValidator(_non_negative)]
Positive = Annotated[float, BeforeValidator(_positive)]
Fraction = Annotated[float, BeforeValidator(_fraction)]
Bool = Annotated[bool, BeforeValidator(_bool)]
TokenIds = Annotated[int, Strict()] | list[Annotated[int, Strict()]] | None
AdapterActivation = Literal["gelu", "relu", "silu"]
FFNActivation = Literal["silu", "gelu_tanh"]
"""The gate activation of every FFN and expert: `silu` (SwiGLU, Llama) or `gelu_tanh`
(GeGLU with the tanh approximation of GELU, Gemma)."""
LayerType = Literal["full_attention", "sliding_attention"]


class _Node(BaseModel):
    """A part of the config: frozen, and every key it is given must be one of its fields."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and cls.model_config.get("extra") != "allow":
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise _Rule("", f": unknown key(s) {unknown}; expected a subset of "
                            f"{sorted(cls.model_fields)}")
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Self:
        """Parse and check JSON data; a `ConfigError` names the offending field, under
        ``where`` (the path of ``data`` in a larger document)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc, data, where)) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON data; `from_dict(to_dict())` gives back an equal config."""
        return self.model_dump(mode="json")


class _Routed(_Node):
    """A part with `num_experts` experts chosen by `router`: a top-k router may keep at
    most all of them."""

    @model_validator(mode="after")
    def _k_fits_the_experts(self) -> Self:
        k, experts = getattr(self.router, "k", None), self.num_experts
        if k is not None and k > experts:
            raise _Rule("router.k", f" = {k} exceeds num_experts = {experts}")
        return self


# --------------------------------------------------------------------------- routers


class TopKRouterConfig(_Node):
    """Token-choice top-k over a softmax of all experts (Mixtral, Switch)."""

    kind: Literal["topk"] = "topk"
    k: PositiveInt
    normalize: Bool = True


class SoftRouterConfig(_Node):
    """Every expert runs, weighted by `softmax(x @ W.T)` over all experts (BAM attention)."""

    kind: Literal["soft"] = "soft"


class TokenMixingRouterConfig(_Node):
    """Mixture of Tokens (Antoniak et al. 2023): tokens at one position of `group_size`
    sequences of the batch are mixed per expert by `softmax(x @ W.T / temperature)` over
    the group. With `learn_temperature` the temperature is a trainable tensor."""

    kind: Literal["token_mixing"] = "token_mixing"
    group_size: PositiveInt
    temperature: Positive = 1.0
    learn_temperature: Bool = False


class NexusRouterConfig(_Node):
    """Nexus (Gritsch et al. 2024): expert embeddings projected from frozen domain
    embeddings of width `domain_dim`; softmax over the experts, top k, raw probabilities
    unless `normalize`."""

    kind: Literal["nexus"] = "nexus"
    k: PositiveInt = 1
    normalize: Bool = False
    domain_dim: PositiveInt


MoERouterConfig = Annotated[
    TopKRouterConfig | TokenMixingRouterConfig | NexusRouterConfig, Field(discriminator="kind")
]
"""Routers of an MoE FFN layer."""

AttentionRouterConfig = Annotated[
    SoftRouterConfig | TopKRouterConfig, Field(discriminator="kind")
]
"""Routers of a mixture-of-attention layer."""

RouterConfig = MoERouterConfig | AttentionRouterConfig
ROUTER_CONFIGS: dict[str, type[_Node]] = {
    get_args(cls.model_fields["kind"].annotation)[0]: cls
    for union in (MoERouterConfig, AttentionRouterConfig) for cls in get_args(get_args(union)[0])
}
"""Every router config, by `kind`."""


def router_config(kind: str, values: Mapping[str, Any]) -> RouterConfig:
    """The config of a `kind` router, from the `values` of its fields (other keys, such as
    a spec's initialisation, are not the model's and are left out)."""
    cls = ROUTER_CONFIGS[kind]
    return cast(RouterConfig, cls.model_validate({f: values[f] for f in cls.model_fields
                                                   if f in values}))


# --------------------------------------------------------------------------- FFN parts


class SharedExpertConfig(_Node):
    """An always-on FFN added to the routed output, optionally scaled by `sigmoid(x @ g.T)`."""

    intermediate_size: PositiveInt
    gate: Bool = False


class AuxLossConfig(_Node):
    """Coefficients of the load-balance (Switch) and router z-loss (ST-MoE) terms."""

    load_balance: NonNegative = 0.0
    z_loss: NonNegative = 0.0


class NewTensor(NamedTuple):
    """A tensor a routed FFN adds to the model at upcycling, initialised rather than taken
    from a source: its native name (a template of the layer `i`), shape, parameter group,
    and initialisation (the arguments of an `init` recipe; `seed`, for one that draws
    random numbers: the key its seed is derived from, with the spec's seed and the layer)."""

    name: str
    shape: tuple[int, ...]
    group: str
    init: dict[str, Any]
    seed: str | None = None


class RoutedFFNConfig(_Routed):
    """Base of the routed FFN configs. Each names the module that computes it (`module`:
    `"file:Class"` in `moecompose.model`, built as `Class(hidden_size, config, dispatch,
    hidden_act)`) and the tensors it adds beyond its experts' FFNs (`new_tensors`)."""

    def module(self) -> str:
        raise NotImplementedError

    def new_tensors(self, hidden_size: int) -> list[NewTensor]:
        return []


class DenseFFNConfig(_Node):
    """The source's gated FFN (SwiGLU, or GeGLU: the model's `hidden_act`), of the model's
    `intermediate_size`."""

    kind: Literal["dense"] = "dense"


class MoEFFNConfig(RoutedFFNConfig):
    """A routed mixture of gated FFN experts (the model's `hidden_act`), with an optional
    shared expert."""

    kind: Literal["moe"] = "moe"
    num_experts: PositiveInt
    intermediate_size: PositiveInt
    router: MoERouterConfig
    shared_expert: SharedExpertConfig | None = None
    aux_loss: AuxLossConfig = AuxLossConfig()

    def module(self) -> str:
        return "token_mixing:TokenMixingFFN" if self.router.kind == "token_mixing" else "moe:MoEFFN"

    @model_validator(mode="after")
    def _token_mixing_has_no_shared_expert(self) -> Self:
        if self.shared_expert is not None and self.router.kind == "token_mixing":
            raise _Rule("shared_expert", " is not supported with a token_mixing router")
        return self


class AdapterFFNConfig(RoutedFFNConfig):
    """PESC (Wu et al. 2024): one shared SwiGLU FFN of width `intermediate_size`; the
    experts are bottleneck adapters (width `bottleneck`) applied to its output, chosen by a
    top-k router that reads the FFN input."""

    kind: Literal["adapters"] = "adapters"
    num_experts: PositiveInt
    intermediate_size: PositiveInt
    bottleneck: PositiveInt
    scale: Number = 1.0
    activation: AdapterActivation = "gelu"
    dropout: Fraction = 0.0
    router: Annotated[TopKRouterConfig, Field(discriminator="kind")]
    aux_loss: AuxLossConfig = AuxLossConfig()

    def module(self) -> str:
        return "adapters:AdapterMoEFFN"

    def new_tensors(self, hidden_size: int) -> list[NewTensor]:
        """Each expert's down-projection as `nn.Linear` initialises it; the up-projection
        at zero, so the layer starts equal to its shared FFN."""
        n, r, d = self.num_experts, self.bottleneck, hidden_size
        return [
            NewTensor("model.layers.{i}.mlp.adapters.down_proj", (n, r, d), "adapters",
                      {"init": "uniform", "bound": 1.0 / d**0.5}, seed="adapter"),
            NewTensor("model.layers.{i}.mlp.adapters.up_proj", (n, d, r), "adapters",
                      {"init": "zeros"}),
        ]


FFNConfig = Annotated[
    DenseFFNConfig | MoEFFNConfig | AdapterFFNConfig, Field(discriminator="kind")
]

FFN_CONFIGS: dict[str, type[RoutedFFNConfig]] = {
    get_args(cls.model_fields["kind"].annotation)[0]: cls
    for cls in get_args(get_args(FFNConfig)[0]) if issubclass(cls, RoutedFFNConfig)
}
"""Every routed FFN config, by `kind`."""


def ffn_config(kind: str, values: Mapping[str, Any]) -> RoutedFFNConfig:
    """The config of a `kind` routed FFN, from the `values` of its fields (other keys are
    left out, as in `router_config`)."""
    cls = FFN_CONFIGS[kind]
    return cls.model_validate({f: values[f] for f in cls.model_fields if f in values})


# --------------------------------------------------------------------------- attention


class DenseAttentionConfig(_Node):
    """The source's grouped-query attention."""

    kind: Literal["dense"] = "dense"


class MoAAttentionConfig(_Routed):
    """Mixture of attention (BAM): `num_experts` attention experts mixed by a router.

    `share` is `()` for expert-KV (each expert its own q, k, v, o) or `("k", "v")` for
    shared-KV (q, o per expert; one k, v projection and one KV cache for all experts).
    """

    kind: Literal["moa"] = "moa"
    num_experts: PositiveInt
    share: tuple[str, ...] = ()
    router: AttentionRouterConfig

    @field_validator("share", mode="before")
    @classmethod
    def _expert_or_shared_kv(cls, share: Any) -> tuple[str, ...]:
        if not isinstance(share, (list, tuple)) or sorted(share) not in ([], ["k", "v"]):
            raise _Rule("", f" must be [] (expert-KV) or ['k', 'v'] (shared-KV), got {share!r}")
        return tuple(sorted(share))

    @property
    def shared_kv(self) -> bool:
        return self.share == ("k", "v")


AttentionConfig = Annotated[
    DenseAttentionConfig | MoAAttentionConfig, Field(discriminator="kind")
]


class LayerConfig(_Node):
    """What one decoder layer is made of: its attention and its FFN."""

    attention: AttentionConfig = DenseAttentionConfig()
    ffn: FFNConfig

    @model_serializer(mode="wrap")
    def _dense_attention_is_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if isinstance(self.attention, DenseAttentionConfig):
            del data["attention"]
        return data


# --------------------------------------------------------------------------- the model


# Rope scaling fields are in the order Hugging Face writes them (sorted), so a source's
# rope_scaling is written back as it was.


class LinearRopeScalingConfig(_Node):
    """HF `linear` rope scaling: every frequency divided by `factor`."""

    factor: Positive
    rope_type: Literal["linear"] = "linear"


class Llama3RopeScalingConfig(_Node):
    """HF `llama3` rope scaling: low frequencies divided by `factor`, high ones kept,
    smoothed between (wavelengths relative to the original context length)."""

    factor: Positive
    high_freq_factor: Number
    low_freq_factor: Number
    original_max_position_embeddings: PositiveInt
    rope_type: Literal["llama3"] = "llama3"


RopeScalingConfig = Annotated[
    LinearRopeScalingConfig | Llama3RopeScalingConfig, Field(discriminator="rope_type")
]


class ModelConfig(_Node):
    """The native `config.json` of a moecompose artifact (format version 1).

    Keys the model code does not read (for example provenance written by the builder) are
    kept as extra fields and written back unchanged, after the known ones, by `to_dict`.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    model_type: Literal["moecompose"] = "moecompose"
    architectures: tuple[Literal["MoECausalLM"]] = ("MoECausalLM",)
    moecompose_format: Literal[1] = FORMAT_VERSION
    family: str = "llama"  # the sources' family: provenance, not read by the model
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: int
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    head_dim: PositiveInt
    hidden_act: FFNActivation = "silu"
    rms_norm_eps: Number = 1e-5
    rope_theta: Number = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    max_position_embeddings: PositiveInt = 2048
    sliding_window: PositiveInt | None = None
    tie_word_embeddings: Bool = False
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    intermediate_size: PositiveInt
    attention_bias: Bool = False
    # RMSNorm of queries and keys before rope: "head" (per head: Qwen3, Gemma 3), "full"
    # (over all heads: OLMo 2), None.
    qk_norm: Literal["head", "full"] | None = None
    # "pre": each branch normalises its input (Llama); "post": its output (OLMo 2);
    # "sandwich": both (Gemma).
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"
    # Every RMSNorm scales by (1 + weight), in fp32 before the cast back (Gemma).
    norm_unit_offset: Bool = False
    # The token embeddings are multiplied by sqrt(hidden_size), in their dtype (Gemma).
    scale_embeddings: Bool = False
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
    query_pre_attn_scalar: Positive | None = None
    # `cap * tanh(z / cap)` of the attention scores / of the output logits (Gemma 2).
    attn_logit_softcapping: Positive | None = None
    final_logit_softcapping: Positive | None = None
    # Each layer's attention kind: "sliding_attention" layers use `sliding_window` and
    # `rope_local_base_freq`, "full_attention" ones neither. None: every layer uses
    # `sliding_window` (Mistral) and the one rope.
    layer_types: tuple[LayerType, ...] | None = None
    # The rope base of "sliding_attention" layers, unscaled (None: as the other layers).
    rope_local_base_freq: Positive | None = None
    block: Literal["sequential", "parallel"] = "sequential"
    dtype: Literal[MODEL_DTYPES] = "float32"  # type: ignore[valid-type]
    layers: tuple[LayerConfig, ...]
    trainable: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _implied_fields(cls, data: Any) -> Any:
        """Fill what the other fields imply: `num_key_value_heads` (= heads), `head_dim`
        (hidden / heads), `num_hidden_layers` (the layers), and HF's rope scaling forms."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        heads, hidden = data.get("num_attention_heads"), data.get("hidden_size")
        if isinstance(heads, int) and heads > 0:
            data.setdefault("num_key_value_heads", heads)
            if data.get("head_dim") is None and isinstance(hidden, int):
                if hidden % heads:
                    raise _Rule("", f"hidden_size ({hidden}) is not divisible by "
                                f"num_attention_heads ({heads}); set head_dim")
                data["head_dim"] = hidden // heads
        if isinstance(data.get("layers"), (list, tuple)):
            data.setdefault("num_hidden_layers", len(data["layers"]))
        scaling = data.get("rope_scaling")
        if isinstance(scaling, Mapping):
            data["rope_scaling"] = _rope_scaling_as_read(
                scaling, data.get("rope_theta", 10000.0), data.get("max_position_embeddings", 2048)
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.num_attention_heads % self.num_key_value_heads:
            raise _Rule("", f"num_attention_heads ({self.num_attention_heads}) must be a "
                        f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise _Rule("head_dim", f" must be even for rotary embeddings, got {self.head_dim}")
        if self.num_hidden_layers != len(self.layers):
            raise _Rule("", f"num_hidden_layers is {self.num_hidden_layers} but layers has "
                        f"{len(self.layers)} entries")
        if self.layer_types is not None and len(self.layer_types) != len(self.layers):
            raise _Rule("layer_types", f" has {len(self.layer_types)} entries but layers has "
                        f"{len(self.layers)}")
        if self.rope_local_base_freq is not None and self.layer_types is None:
            raise _Rule("rope_local_base_freq", " needs layer_types (which layers are local)")
        return self

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` is a sliding-window ("local") layer of `layer_types`."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`'s attention (None: it sees every earlier token)."""
        if self.layer_types is None or self.is_sliding(layer):
            return self.sliding_window
        return None

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` uses the local rope (`rope_local_base_freq`, unscaled)
        rather than `rope_theta` and `rope_scaling`."""
        return self.rope_local_base_freq is not None and self.is_sliding(layer)


def _rope_scaling_as_read(
    scaling: Mapping[str, Any], rope_theta: Any, max_positions: Any
) -> dict[str, Any] | None:
    """HF's `rope_scaling` (or its newer `rope_parameters` form) as this model reads it:
    `type` is the old name of `rope_type`, `default` is no scaling, `rope_theta` and
    `partial_rotary_factor` are accepted only when they change nothing, and llama3's
    original context length defaults to `max_position_embeddings`."""
    scaling = dict(scaling)
    theta = scaling.pop("rope_theta", rope_theta)
    if theta != rope_theta:
        raise _Rule("rope_scaling.rope_theta", f" ({theta}) differs from rope_theta ({rope_theta})")
    if scaling.pop("partial_rotary_factor", 1.0) != 1.0:
        raise _Rule("rope_scaling.partial_rotary_factor", " != 1 is not supported by this version")
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type") == "default":
        return None
    if scaling.get("rope_type") == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    return scaling


# --------------------------------------------------------------------------- messages


_TAGS = ("kind", "rope_type", "type")


def _one_line(exc: ValidationError, data: Any, where: str) -> str:
    """The first error of ``exc`` as one line that names the field (``layers[1].ffn.k``)."""
    error = exc.errors()[0]
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx", {})
    path = _path(where, loc, data)
    if kind == "missing":
        parent, _, key = path.rpartition(".")
        return f"{parent or 'config'}: missing required key '{key}'"
    if kind == "union_tag_invalid":
        name = ctx["discriminator"].strip("'")
        what = f"{path.rpartition('.')[2]} kind" if name == "kind" else name
        return (f"{path}: {what} {ctx['tag']!r} is not supported by this version "
                f"(supported: {ctx['expected_tags']})")
    if kind == "union_tag_not_found":
        return f"{path}: missing required key {ctx['discriminator']}"
    if kind == "literal_error":
        return (f"{path} {error['input']!r} is not supported by this version "
                f"(supported: {ctx['expected']})")
    rule = ctx.get("error")
    if isinstance(rule, _Rule):
        path = ".".join(p for p in (path, rule.field) if p)
        return f"{path}{rule.text}" if path else rule.text.lstrip(": ")
    return f"{path or 'config'}: {error['msg']}"


def _path(where: str, loc: tuple[int | str, ...], data: Any) -> str:
    """``loc`` as written in the document (``layers[1].ffn.router``), without the tags
    pydantic inserts for the member of a discriminated union it chose."""
    path, node = where, data
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
            node = node[item] if isinstance(node, (list, tuple)) and item < len(node) else None
            continue
        fields = node if isinstance(node, Mapping) else getattr(node, "__dict__", None)
        if node is not None and (fields is None or (
                item not in fields and any(fields.get(tag) == item for tag in _TAGS))):
            continue  # the tag of a union member, or a label inside a union of scalars
        path = f"{path}.{item}" if path else item
        node = None if fields is None else fields.get(item)
    return path
