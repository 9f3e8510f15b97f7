"""The native model configuration: the `config.json` of a built artifact, as typed values.

`ModelConfig.from_dict` checks every field the model code reads and fails with a message
naming the field; `to_dict` writes the same JSON back. See `docs/artifact-format.md`.

Layer descriptors are parsed through small registries (`FFN_KINDS`, `ATTENTION_KINDS`,
`ROUTER_KINDS`, `ATTENTION_ROUTER_KINDS`), so a new kind is one parser plus one module,
and a kind this version does not know fails here, at load time, with its name in the
message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

FORMAT_VERSION = 1

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

BLOCKS = ("sequential", "parallel")
ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "rope_theta", "partial_rotary_factor",
}  # fmt: skip


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; expected a subset of {sorted(allowed)}"
        )


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where}: missing required key '{key}'")
    return d[key]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------- routers


_K = TypeVar("_K", bound="KindOnly")


class KindOnly:
    """A descriptor with nothing but its ``kind`` (``{"kind": ...}`` in the config)."""

    kind: ClassVar[str]

    @classmethod
    def from_dict(cls: type[_K], d: Mapping[str, Any], where: str) -> _K:
        _check_keys(d, {"kind"}, where)
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class TopKRouterSpec:
    """Token-choice top-k over a softmax of all experts (Mixtral, Switch)."""

    k: int
    normalize: bool = True
    kind: ClassVar[str] = "topk"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TopKRouterSpec:
        _check_keys(d, {"kind", "k", "normalize"}, where)
        k = _positive_int(_require(d, "k", where), f"{where}.k")
        return cls(k=k, normalize=_bool(d.get("normalize", True), f"{where}.normalize"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "normalize": self.normalize}


@dataclass(frozen=True)
class SoftRouterSpec(KindOnly):
    """Every expert runs, weighted by `softmax(x @ W.T)` over all experts (BAM attention)."""

    kind: ClassVar[str] = "soft"


@dataclass(frozen=True)
class TokenMixingRouterSpec:
    """Mixture of Tokens (Antoniak et al. 2023): tokens at one position of `group_size`
    sequences of the batch are mixed per expert by `softmax(x @ W.T / temperature)` over
    the group. With `learn_temperature` the temperature is a trainable tensor."""

    group_size: int
    temperature: float = 1.0
    learn_temperature: bool = False
    kind: ClassVar[str] = "token_mixing"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TokenMixingRouterSpec:
        _check_keys(d, {"kind", "group_size", "temperature", "learn_temperature"}, where)
        group = _positive_int(_require(d, "group_size", where), f"{where}.group_size")
        temperature = _non_negative_float(d.get("temperature", 1.0), f"{where}.temperature")
        if temperature == 0:
            raise ValueError(f"{where}.temperature must be positive, got 0")
        learn = _bool(d.get("learn_temperature", False), f"{where}.learn_temperature")
        return cls(group_size=group, temperature=temperature, learn_temperature=learn)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "group_size": self.group_size,
            "temperature": self.temperature,
            "learn_temperature": self.learn_temperature,
        }


@dataclass(frozen=True)
class NexusRouterSpec:
    """Nexus (Gritsch et al. 2024): expert embeddings projected from frozen domain
    embeddings of width `domain_dim`; softmax over the experts, top k, raw probabilities
    unless `normalize`."""

    domain_dim: int
    k: int = 1
    normalize: bool = False
    kind: ClassVar[str] = "nexus"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> NexusRouterSpec:
        _check_keys(d, {"kind", "k", "normalize", "domain_dim"}, where)
        return cls(
            domain_dim=_positive_int(_require(d, "domain_dim", where), f"{where}.domain_dim"),
            k=_positive_int(d.get("k", 1), f"{where}.k"),
            normalize=_bool(d.get("normalize", False), f"{where}.normalize"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "k": self.k,
            "normalize": self.normalize,
            "domain_dim": self.domain_dim,
        }


RouterSpec = TopKRouterSpec | SoftRouterSpec | TokenMixingRouterSpec | NexusRouterSpec
RouterParser = Callable[[Mapping[str, Any], str], RouterSpec]

ROUTER_KINDS: dict[str, RouterParser] = {
    TopKRouterSpec.kind: TopKRouterSpec.from_dict,
    TokenMixingRouterSpec.kind: TokenMixingRouterSpec.from_dict,
    NexusRouterSpec.kind: NexusRouterSpec.from_dict,
}
"""Routers of an MoE FFN layer."""

ADAPTER_ROUTER_KINDS: dict[str, RouterParser] = {
    TopKRouterSpec.kind: TopKRouterSpec.from_dict,
}
"""Routers of an adapter-experts (PESC) FFN layer."""

ATTENTION_ROUTER_KINDS: dict[str, RouterParser] = {
    SoftRouterSpec.kind: SoftRouterSpec.from_dict,
    TopKRouterSpec.kind: TopKRouterSpec.from_dict,
}
"""Routers of a mixture-of-attention layer."""


def parse_router(
    d: Mapping[str, Any], where: str, kinds: Mapping[str, RouterParser] = ROUTER_KINDS
) -> RouterSpec:
    kind = _require(d, "kind", where)
    if kind not in kinds:
        raise ValueError(
            f"{where}: router kind '{kind}' is not supported by this version "
            f"(supported: {sorted(kinds)})"
        )
    return kinds[kind](d, where)


# --------------------------------------------------------------------------- FFN parts


@dataclass(frozen=True)
class SharedExpertSpec:
    """An always-on FFN added to the routed output, optionally scaled by `sigmoid(x @ g.T)`."""

    intermediate_size: int
    gate: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> SharedExpertSpec:
        _check_keys(d, {"intermediate_size", "gate"}, where)
        size = _positive_int(_require(d, "intermediate_size", where), f"{where}.intermediate_size")
        return cls(intermediate_size=size, gate=_bool(d.get("gate", False), f"{where}.gate"))

    def to_dict(self) -> dict[str, Any]:
        return {"intermediate_size": self.intermediate_size, "gate": self.gate}


@dataclass(frozen=True)
class AuxLossSpec:
    """Coefficients of the load-balance (Switch) and router z-loss (ST-MoE) terms."""

    load_balance: float = 0.0
    z_loss: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str) -> AuxLossSpec:
        if d is None:
            return cls()
        _check_keys(d, {"load_balance", "z_loss"}, where)
        return cls(
            load_balance=_non_negative_float(d.get("load_balance", 0.0), f"{where}.load_balance"),
            z_loss=_non_negative_float(d.get("z_loss", 0.0), f"{where}.z_loss"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"load_balance": self.load_balance, "z_loss": self.z_loss}


@dataclass(frozen=True)
class DenseFFNSpec(KindOnly):
    """The source's SwiGLU FFN, of the model's `intermediate_size`."""

    kind: ClassVar[str] = "dense"


@dataclass(frozen=True)
class MoEFFNSpec:
    """A routed mixture of SwiGLU experts, with an optional shared expert."""

    num_experts: int
    intermediate_size: int
    router: RouterSpec
    shared_expert: SharedExpertSpec | None = None
    aux_loss: AuxLossSpec = field(default_factory=AuxLossSpec)
    kind: ClassVar[str] = "moe"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> MoEFFNSpec:
        _check_keys(
            d,
            {"kind", "num_experts", "intermediate_size", "router", "shared_expert", "aux_loss"},
            where,
        )
        num_experts = _positive_int(_require(d, "num_experts", where), f"{where}.num_experts")
        size = _positive_int(_require(d, "intermediate_size", where), f"{where}.intermediate_size")
        router = parse_router(_require(d, "router", where), f"{where}.router")
        if isinstance(router, (TopKRouterSpec, NexusRouterSpec)) and router.k > num_experts:
            raise ValueError(f"{where}.router.k = {router.k} exceeds num_experts = {num_experts}")
        shared = d.get("shared_expert")
        return cls(
            num_experts=num_experts,
            intermediate_size=size,
            router=router,
            shared_expert=None
            if shared is None
            else SharedExpertSpec.from_dict(shared, f"{where}.shared_expert"),
            aux_loss=AuxLossSpec.from_dict(d.get("aux_loss"), f"{where}.aux_loss"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_experts": self.num_experts,
            "intermediate_size": self.intermediate_size,
            "router": self.router.to_dict(),
            "shared_expert": None if self.shared_expert is None else self.shared_expert.to_dict(),
            "aux_loss": self.aux_loss.to_dict(),
        }


ADAPTER_ACTIVATIONS = ("gelu", "relu", "silu")


@dataclass(frozen=True)
class AdapterFFNSpec:
    """PESC (Wu et al. 2024): one shared SwiGLU FFN of width `intermediate_size`; the
    experts are bottleneck adapters (width `bottleneck`) applied to its output, chosen by a
    top-k router that reads the FFN input."""

    num_experts: int
    intermediate_size: int
    bottleneck: int
    router: TopKRouterSpec
    scale: float = 1.0
    activation: str = "gelu"
    dropout: float = 0.0
    aux_loss: AuxLossSpec = field(default_factory=AuxLossSpec)
    kind: ClassVar[str] = "adapters"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> AdapterFFNSpec:
        _check_keys(
            d,
            {"kind", "num_experts", "intermediate_size", "bottleneck", "scale", "activation",
             "dropout", "router", "aux_loss"},
            where,
        )  # fmt: skip
        num_experts = _positive_int(_require(d, "num_experts", where), f"{where}.num_experts")
        router = parse_router(_require(d, "router", where), f"{where}.router", ADAPTER_ROUTER_KINDS)
        assert isinstance(router, TopKRouterSpec)
        if router.k > num_experts:
            raise ValueError(f"{where}.router.k = {router.k} exceeds num_experts = {num_experts}")
        scale = d.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"{where}.scale must be a number, got {scale!r}")
        activation = d.get("activation", "gelu")
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"{where}.activation {activation!r} is not supported by this version "
                f"(supported: {list(ADAPTER_ACTIVATIONS)})"
            )
        dropout = _non_negative_float(d.get("dropout", 0.0), f"{where}.dropout")
        if dropout >= 1:
            raise ValueError(f"{where}.dropout must be in [0, 1), got {dropout}")
        return cls(
            num_experts=num_experts,
            intermediate_size=_positive_int(
                _require(d, "intermediate_size", where), f"{where}.intermediate_size"
            ),
            bottleneck=_positive_int(_require(d, "bottleneck", where), f"{where}.bottleneck"),
            router=router,
            scale=float(scale),
            activation=activation,
            dropout=dropout,
            aux_loss=AuxLossSpec.from_dict(d.get("aux_loss"), f"{where}.aux_loss"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_experts": self.num_experts,
            "intermediate_size": self.intermediate_size,
            "bottleneck": self.bottleneck,
            "scale": self.scale,
            "activation": self.activation,
            "dropout": self.dropout,
            "router": self.router.to_dict(),
            "aux_loss": self.aux_loss.to_dict(),
        }


FFNSpec = DenseFFNSpec | MoEFFNSpec | AdapterFFNSpec

FFN_KINDS: dict[str, Callable[[Mapping[str, Any], str], FFNSpec]] = {
    DenseFFNSpec.kind: DenseFFNSpec.from_dict,
    MoEFFNSpec.kind: MoEFFNSpec.from_dict,
    AdapterFFNSpec.kind: AdapterFFNSpec.from_dict,
}


def parse_ffn(d: Mapping[str, Any], where: str) -> FFNSpec:
    kind = _require(d, "kind", where)
    if kind not in FFN_KINDS:
        raise ValueError(
            f"{where}: ffn kind '{kind}' is not supported by this version (supported: {sorted(FFN_KINDS)})"
        )
    return FFN_KINDS[kind](d, where)


# --------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class DenseAttentionSpec(KindOnly):
    """The source's grouped-query attention."""

    kind: ClassVar[str] = "dense"


SHARES = ((), ("k", "v"))


@dataclass(frozen=True)
class MoAAttentionSpec:
    """Mixture of attention (BAM): `num_experts` attention experts mixed by a router.

    `share` is `()` for expert-KV (each expert its own q, k, v, o) or `("k", "v")` for
    shared-KV (q, o per expert; one k, v projection and one KV cache for all experts).
    """

    num_experts: int
    router: RouterSpec
    share: tuple[str, ...] = ()
    kind: ClassVar[str] = "moa"

    @property
    def shared_kv(self) -> bool:
        return self.share == ("k", "v")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> MoAAttentionSpec:
        _check_keys(d, {"kind", "num_experts", "share", "router"}, where)
        num_experts = _positive_int(_require(d, "num_experts", where), f"{where}.num_experts")
        router = parse_router(
            _require(d, "router", where), f"{where}.router", ATTENTION_ROUTER_KINDS
        )
        if isinstance(router, TopKRouterSpec) and router.k > num_experts:
            raise ValueError(f"{where}.router.k = {router.k} exceeds num_experts = {num_experts}")
        share = d.get("share", [])
        if not isinstance(share, list) or tuple(sorted(share)) not in SHARES:
            raise ValueError(
                f"{where}.share must be [] (expert-KV) or ['k', 'v'] (shared-KV), got {share!r}"
            )
        return cls(num_experts=num_experts, router=router, share=tuple(sorted(share)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_experts": self.num_experts,
            "share": list(self.share),
            "router": self.router.to_dict(),
        }


AttentionSpec = DenseAttentionSpec | MoAAttentionSpec

ATTENTION_KINDS: dict[str, Callable[[Mapping[str, Any], str], AttentionSpec]] = {
    DenseAttentionSpec.kind: DenseAttentionSpec.from_dict,
    MoAAttentionSpec.kind: MoAAttentionSpec.from_dict,
}


def parse_attention(d: Mapping[str, Any] | None, where: str) -> AttentionSpec:
    """None (key absent) is dense attention."""
    if d is None:
        return DenseAttentionSpec()
    kind = _require(d, "kind", where)
    if kind not in ATTENTION_KINDS:
        raise ValueError(
            f"{where}: attention kind '{kind}' is not supported by this version "
            f"(supported: {sorted(ATTENTION_KINDS)})"
        )
    return ATTENTION_KINDS[kind](d, where)


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is made of: its attention and its FFN."""

    ffn: FFNSpec
    attention: AttentionSpec = field(default_factory=DenseAttentionSpec)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> LayerSpec:
        _check_keys(d, {"ffn", "attention"}, where)
        return cls(
            ffn=parse_ffn(_require(d, "ffn", where), f"{where}.ffn"),
            attention=parse_attention(d.get("attention"), f"{where}.attention"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Dense attention is written as an absent key."""
        out: dict[str, Any] = {"ffn": self.ffn.to_dict()}
        if not isinstance(self.attention, DenseAttentionSpec):
            out["attention"] = self.attention.to_dict()
        return out


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`: `linear` (factor) or `llama3` (factor, low/high_freq_factor, original length)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None, max_position_embeddings: int, rope_theta: float
    ) -> RopeScaling | None:
        """None for no scaling; `rope_theta` and `partial_rotary_factor` (HF's newer
        `rope_parameters` form) are accepted only when they change nothing."""
        if d is None:
            return None
        _check_keys(d, _ROPE_KEYS, "rope_scaling")
        if float(d.get("rope_theta", rope_theta)) != rope_theta:
            raise ValueError(
                f"rope_scaling.rope_theta ({d['rope_theta']}) differs from rope_theta ({rope_theta})"
            )
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "rope_scaling.partial_rotary_factor != 1 is not supported by this version"
            )
        rope_type = d.get("rope_type", d.get("type"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: rope_type {rope_type!r} is not supported by this version "
                f"(supported: {list(ROPE_TYPES)})"
            )
        factor = _require(d, "factor", "rope_scaling")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise ValueError(f"rope_scaling.factor must be a positive number, got {factor!r}")
        if rope_type == "linear":
            return cls(rope_type=rope_type, factor=float(factor))
        return cls(
            rope_type=rope_type,
            factor=float(factor),
            low_freq_factor=float(_require(d, "low_freq_factor", "rope_scaling")),
            high_freq_factor=float(_require(d, "high_freq_factor", "rope_scaling")),
            original_max_position_embeddings=int(
                d.get("original_max_position_embeddings", max_position_embeddings)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


_MODEL_KEYS = {
    "model_type", "architectures", "moecompose_format", "family", "vocab_size", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
    "max_position_embeddings", "sliding_window", "tie_word_embeddings", "attention_bias",
    "block", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "layers", "trainable",
}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """The native `config.json` of a moecompose artifact (format version 1).

    Keys the model code does not read (for example provenance written by the builder) are
    kept in `extra` and written back unchanged by `to_dict`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    family: str = "llama"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    block: str = "sequential"
    dtype: str = "float32"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    trainable: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Parse and check a native config dict; raises ValueError naming the offending field."""
        version = d.get("moecompose_format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"moecompose_format {version!r} is not supported by this version (expected {FORMAT_VERSION})"
            )
        model_type = d.get("model_type", "moecompose")
        if model_type != "moecompose":
            raise ValueError(
                f"model_type {model_type!r} is not a native moecompose config; convert it first"
            )

        hidden = _positive_int(_require(d, "hidden_size", "config"), "hidden_size")
        heads = _positive_int(_require(d, "num_attention_heads", "config"), "num_attention_heads")
        kv_heads = _positive_int(d.get("num_key_value_heads", heads), "num_key_value_heads")
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(
                    f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); set head_dim"
                )
            head_dim = hidden // heads
        head_dim = _positive_int(head_dim, "head_dim")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")

        raw_layers = _require(d, "layers", "config")
        if not isinstance(raw_layers, list):
            raise ValueError("layers must be a list with one entry per decoder layer")
        layers = tuple(
            LayerSpec.from_dict(layer, f"layers[{i}]") for i, layer in enumerate(raw_layers)
        )
        declared = d.get("num_hidden_layers", len(layers))
        if declared != len(layers):
            raise ValueError(
                f"num_hidden_layers is {declared} but layers has {len(layers)} entries"
            )

        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(
                f"hidden_act {hidden_act!r} is not supported by this version (supported: ['silu'])"
            )
        block = d.get("block", "sequential")
        if block not in BLOCKS:
            raise ValueError(
                f"block {block!r} is not supported by this version (supported: {list(BLOCKS)})"
            )
        dtype = d.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported (supported: {list(DTYPES)})")
        trainable = d.get("trainable")
        if trainable is not None:
            if not isinstance(trainable, list) or not all(isinstance(n, str) for n in trainable):
                raise ValueError("trainable must be null or a list of tensor names")
            trainable = tuple(trainable)

        max_pos = _positive_int(d.get("max_position_embeddings", 2048), "max_position_embeddings")
        window = d.get("sliding_window")
        if window is not None:
            window = _positive_int(window, "sliding_window")
        rope_theta = float(d.get("rope_theta", 10000.0))
        return cls(
            vocab_size=_positive_int(_require(d, "vocab_size", "config"), "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(
                _require(d, "intermediate_size", "config"), "intermediate_size"
            ),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            layers=layers,
            family=d.get("family", "llama"),
            hidden_act=hidden_act,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=RopeScaling.from_dict(d.get("rope_scaling"), max_pos, rope_theta),
            max_position_embeddings=max_pos,
            sliding_window=window,
            tie_word_embeddings=_bool(d.get("tie_word_embeddings", False), "tie_word_embeddings"),
            attention_bias=_bool(d.get("attention_bias", False), "attention_bias"),
            block=block,
            dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            trainable=trainable,
            extra={k: v for k, v in d.items() if k not in _MODEL_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The native `config.json` content; `from_dict(to_dict())` gives back an equal config."""
        return {
            "model_type": "moecompose",
            "architectures": ["MoECausalLM"],
            "moecompose_format": FORMAT_VERSION,
            "family": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_dict(),
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "block": self.block,
            "dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "layers": [layer.to_dict() for layer in self.layers],
            "trainable": None if self.trainable is None else list(self.trainable),
            **self.extra,
        }
