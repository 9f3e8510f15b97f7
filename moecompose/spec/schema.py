"""The mix spec, format version 1, as pydantic models: the one IR every front end produces.

Field names, defaults and meanings follow docs/spec.md. Every model forbids unknown keys
(with a did-you-mean hint) and is frozen, so a ``Spec`` is a value: compare it, hash its
JSON, derive variants with :meth:`Spec.with_`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from moecompose.errors import did_you_mean, one_of
from moecompose.spec.origin import Origin

MAX_INT = 2**53  # every count, width and seed stays exactly representable in JSON
SourceName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
        description="A name from `sources`.",
    ),
]


class Node(BaseModel):
    """Base of every spec model: unknown keys are errors that suggest the closest key."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known and key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key '{key}' ({hint})",
                        {"key": key, "hint": cls.unknown_key_hint(key, known)},
                    )
        return data

    @classmethod
    def unknown_key_hint(cls, key: str, known: list[str]) -> str:
        """What to say about ``key``, unknown here, given the ``known`` keys."""
        return cls.key_hints().get(key) or did_you_mean(key, known) or f"valid keys: {one_of(known)}"

    @classmethod
    def key_hints(cls) -> dict[str, str]:
        """Hints for keys that are plausible but wrong here."""
        return {}


# ---------------------------------------------------------------------------- layers


class LayerRange(Node):
    """Layers ``from, from+every, ...`` below ``to`` (exclusive)."""

    from_: StrictInt = Field(0, alias="from", ge=0, le=MAX_INT, description="First layer (inclusive).")
    to: StrictInt | None = Field(
        None, ge=1, le=MAX_INT, description="End layer (exclusive); default: the number of layers."
    )
    every: StrictInt = Field(1, ge=1, le=MAX_INT, description="Step between selected layers.")

    @model_validator(mode="after")
    def _ordered(self) -> LayerRange:
        if self.to is not None and self.to <= self.from_:
            raise PydanticCustomError(
                "empty_range",
                "empty layer range: 'to' ({to}) must be greater than 'from' ({start})",
                {"to": self.to, "start": self.from_},
            )
        return self


def _tagger(*rules: tuple[str, Callable[[Any], bool]]) -> Callable[[Any], str | None]:
    """A union's discriminator: the tag of the first rule whose test accepts the value
    (None: no form fits, which pydantic reports with the union's own message)."""

    def tag(value: Any) -> str | None:
        return next((name for name, test in rules if test(value)), None)

    return tag


def _mapping(model: type[BaseModel], key: str | None = None) -> Callable[[Any], bool]:
    """Accepts an instance of ``model``, or a mapping (holding ``key``, when given)."""
    return lambda v: isinstance(v, model) or (isinstance(v, dict) and (key is None or key in v))


_select_tag = _tagger(("select-all", lambda v: v == "all"),
                      ("select-list", lambda v: isinstance(v, list)),
                      ("select-range", _mapping(LayerRange)))


Select = Annotated[
    Annotated[Literal["all"], Tag("select-all")] | Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_INT)]], Tag("select-list")] | Annotated[LayerRange, Tag("select-range")],
    Discriminator(
        _select_tag,
        custom_error_type="invalid_select",
        custom_error_message="expected 'all', a list of layer indices, or {from, to, every}",
    ),
]

# --------------------------------------------------------------------------- experts


class ExpertsNode(Node):
    """Base of the expert kinds written as a mapping (a list of sources is the plain kind).
    What the checks and the resolver need is declared on each kind, so they treat every
    kind alike (`named_sources`, `expert_sources`): `named()`, every source it names (the
    path below `experts`, the name, what it is); `experts()`, each expert's source and
    drop rate; `own_ffn`, False where the experts share one FFN (they can then be neither
    cut into fine-grained shards nor mix tokens); `title`, what the kind is called in
    messages. What the planner needs: `ffn`, the `kind` of the model's FFN config its
    layers become (its fields of the same names as the config's fill them); `summary()`,
    its experts in the plan's table (None: the list of their sources)."""

    own_ffn: ClassVar[bool] = True
    title: ClassVar[str]
    ffn: ClassVar[str] = "moe"

    def named(self) -> list[tuple[tuple[str, ...], str, str]]:
        raise NotImplementedError

    def experts(self) -> list[tuple[str, float]]:
        raise NotImplementedError

    def summary(self) -> str | None:
        return None


class CopyExperts(ExpertsNode):
    """``count`` experts copied from one source's FFN (sparse upcycling)."""

    title: ClassVar[str] = "copied experts"

    copy_: SourceName = Field(alias="copy", description="Source whose FFN every expert copies.")
    count: StrictInt = Field(ge=1, le=1024, description="Number of experts.")
    drop: StrictFloat = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Drop-upcycling: fraction of each expert's FFN neurons re-initialised "
        "from N(mean, std) of the replaced values (0.5 in the paper; 0 = exact copies).",
    )

    def named(self) -> list[tuple[tuple[str, ...], str, str]]:
        return [(("copy",), self.copy_, "copy source")]

    def experts(self) -> list[tuple[str, float]]:
        return [(self.copy_, self.drop)] * self.count


class AdapterExperts(ExpertsNode):
    """PESC: one shared FFN copied from ``adapters``; experts are bottleneck adapters."""

    own_ffn: ClassVar[bool] = False
    title: ClassVar[str] = "adapter experts (PESC)"
    ffn: ClassVar[str] = "adapters"

    adapters: SourceName = Field(description="Source whose FFN every expert shares.")
    count: StrictInt = Field(ge=1, le=1024, description="Number of adapter experts.")
    bottleneck: StrictInt = Field(64, ge=1, le=MAX_INT, description="Adapter width r (512 in the released models).")
    scale: StrictFloat = Field(1.0, description="Adapter output scale s (0.25 in the released models).")
    activation: Literal["gelu", "relu", "silu"] = Field("gelu", description="Adapter activation.")
    dropout: StrictFloat = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout after the adapter down-projection."
    )

    def named(self) -> list[tuple[tuple[str, ...], str, str]]:
        return [(("adapters",), self.adapters, "adapter source")]

    def experts(self) -> list[tuple[str, float]]:
        return [(self.adapters, 0.0)] * self.count

    def summary(self) -> str | None:
        return f"{self.count} adapters on {self.adapters} (r={self.bottleneck})"


_experts_tag = _tagger(("experts-list", lambda v: isinstance(v, list)),
                       ("experts-adapters", _mapping(AdapterExperts, "adapters")),
                       ("experts-copy", _mapping(CopyExperts)))


Experts = Annotated[
    Annotated[list[SourceName], Tag("experts-list")] | Annotated[CopyExperts, Tag("experts-copy")] | Annotated[AdapterExperts, Tag("experts-adapters")],
    Discriminator(
        _experts_tag,
        custom_error_type="invalid_experts",
        custom_error_message="expected a list of source names, {copy: SOURCE, count: N}, "
        "or {adapters: SOURCE, count: N}",
    ),
]


def named_sources(experts: list[str] | ExpertsNode) -> list[tuple[tuple[str | int, ...], str, str]]:
    """Every source a layer's experts name: (path below `experts`, name, what it is)."""
    if isinstance(experts, list):
        return [((j,), name, "expert") for j, name in enumerate(experts)]
    return list(experts.named())


def expert_sources(experts: list[str] | ExpertsNode) -> list[tuple[str, float]]:
    """Each expert's source and drop rate, in expert order."""
    if isinstance(experts, list):
        return [(name, 0.0) for name in experts]
    return experts.experts()


# --------------------------------------------------------------------------- routers


class PromptInit(Node):
    """Router rows from prompts: row e, per layer, is the mean hidden state at the layer's
    input over the prompts of expert e (minus that of its negative prompts), L2-normalised."""

    prompts: dict[SourceName, list[str]] = Field(
        min_length=1, description="expert (source name) -> prompts that should route to it."
    )
    negative: dict[SourceName, list[str]] | None = Field(
        None, description="expert -> prompts that should not route to it (subtracted)."
    )
    source: SourceName | None = Field(
        None, description="The model run over the prompts; default: `embed_with`, else the "
        "first source.",
    )
    max_tokens: StrictInt = Field(512, ge=1, le=MAX_INT, description="Each prompt is truncated to this many tokens.")


class RouterNode(Node):
    """Base of the router kinds. What a kind may route is declared on it, so the checks
    and the planner treat every kind alike: ``routes``, the mixtures it can route
    (``"ffn"``, ``"attention"``); ``not_fine_grained``, why it cannot route fine-grained
    expert shards (None: it can). The model config a kind becomes is the config of the
    same ``kind`` (``moecompose.model.config.router_config``), from the fields they share."""

    routes: ClassVar[tuple[str, ...]]
    not_fine_grained: ClassVar[str | None] = None


class TopKRouter(RouterNode):
    """Token-choice top-k: softmax over all experts, keep the k best (Mixtral, BTX)."""

    routes: ClassVar[tuple[str, ...]] = ("ffn", "attention")

    kind: Literal["topk"] = Field(description="Token-choice top-k routing.")
    k: StrictInt = Field(2, ge=1, le=MAX_INT, description="Experts per token.")
    normalize: bool = Field(
        True, description="Renormalise the k kept probabilities to sum to 1 (Mixtral)."
    )
    init: Literal["random", "zeros"] | PromptInit = Field(
        "random",
        description="Router weights: N(0, init_std) seeded by `seed`, zeros, or "
        "{prompts: {EXPERT: [...]}} (rows from the experts' prompts' hidden states).",
    )
    init_std: StrictFloat = Field(0.02, gt=0.0, description="Std of the random router init.")


class SoftRouter(RouterNode):
    """Soft routing: every expert runs, weighted by softmax(x @ W) (BAM attention)."""

    routes: ClassVar[tuple[str, ...]] = ("attention",)
    not_fine_grained: ClassVar[str | None] = "soft routing is for attention experts"

    kind: Literal["soft"] = Field(description="Every expert runs, weighted (attention only).")
    init: Literal["random", "zeros"] = Field(
        "random", description="Router weights: N(0, init_std) seeded by `seed`, or zeros."
    )

    @classmethod
    def key_hints(cls) -> dict[str, str]:
        hint = "soft routing weights every expert; use kind: topk to choose k"
        return {"k": hint, "normalize": hint}
    init_std: StrictFloat = Field(0.02, gt=0.0, description="Std of the random router init.")


class NexusRouter(RouterNode):
    """Router projected from domain embeddings (Nexus): per layer, expert embeddings
    ``e = W2 . SwiGLU(W1 . dom)``, scores ``softmax(x . e^T)``."""

    routes: ClassVar[tuple[str, ...]] = ("ffn",)
    not_fine_grained: ClassVar[str | None] = (
        "the nexus router's rows come from one domain embedding per expert, and shards of "
        "one expert cannot share a domain")

    kind: Literal["nexus"] = Field(description="Router projected from domain embeddings.")
    k: StrictInt = Field(1, ge=1, le=MAX_INT, description="Routed experts per token.")
    normalize: bool = Field(
        False, description="Renormalise the k kept probabilities (Nexus does not)."
    )

    @classmethod
    def key_hints(cls) -> dict[str, str]:
        hint = "the nexus projection has a fixed initialisation (docs/spec.md)"
        return {"init": hint, "init_std": hint}


class TokenMixingRouter(RouterNode):
    """Mixture of Tokens: tokens at one position of G sequences are mixed per expert."""

    routes: ClassVar[tuple[str, ...]] = ("ffn",)
    not_fine_grained: ClassVar[str | None] = "token mixing has no top-k to widen to k x granularity"

    kind: Literal["token_mixing"] = Field(description="Mixture of Tokens: no discrete routing.")
    group_size: StrictInt = Field(ge=1, le=MAX_INT, description="G: sequences of the batch mixed at each position.")
    temperature: StrictFloat = Field(1.0, gt=0.0, description="Softmax temperature T.")
    learn_temperature: bool = Field(False, description="Make T a trainable parameter.")
    batch_size: StrictInt | None = Field(
        None, ge=1, le=MAX_INT, description="The batch size you will train with; G must not exceed it."
    )
    init: Literal["random", "zeros"] = Field("random", description="Controller init.")
    init_std: StrictFloat = Field(0.02, gt=0.0, description="Std of the random controller init.")

    @classmethod
    def key_hints(cls) -> dict[str, str]:
        hint = "token mixing sends every token to every expert; 'k' applies to kind: topk"
        return {"k": hint, "normalize": hint}


Router = Annotated[
    TopKRouter | SoftRouter | NexusRouter | TokenMixingRouter,
    Field(discriminator="kind"),
]
ROUTER_NODES: tuple[type[RouterNode], ...] = get_args(get_args(Router)[0])
ROUTER_KINDS: tuple[str, ...] = tuple(get_args(r.model_fields["kind"].annotation)[0]
                                      for r in ROUTER_NODES)


class AuxLoss(Node):
    """Auxiliary router losses, added to the LM loss, summed over MoE layers."""

    load_balance: StrictFloat = Field(0.01, ge=0.0, description="Switch load-balance coefficient.")
    z_loss: StrictFloat = Field(0.001, ge=0.0, description="ST-MoE router z-loss coefficient.")


class FFNMix(Node):
    """The FFN mixture of the selected layers."""

    experts: Experts = Field(
        description="[a, b]: one FFN expert per source; {copy: SRC, count: N, drop: r}: "
        "copies of one FFN; {adapters: SRC, count: N}: PESC adapters on one shared FFN."
    )
    granularity: StrictInt = Field(
        1,
        ge=1,
        le=1024,
        description="Fine-grained experts (He et al. 2024): each FFN expert is split along "
        "its intermediate dimension into G shards, giving experts x G experts routed top-(k x G); "
        "the layer equals the coarse MoE at build time. FFN experts and topk routers only; "
        "the FFN width must be divisible by G.",
    )
    shared: SourceName | None = Field(
        None, description="Source whose FFN is an always-on shared expert."
    )
    router: Router = Field(
        default_factory=lambda: TopKRouter(kind="topk"),
        description="topk (default k=2), nexus (needs `domains`) or token_mixing.",
    )
    aux_loss: AuxLoss = Field(default_factory=AuxLoss, description="Router loss coefficients.")


class AttentionMix(Node):
    """Mixture of attention (BAM): one attention expert per listed source."""

    experts: list[SourceName] = Field(
        description="One attention expert (q, k, v, o) per listed source."
    )
    share: list[Literal["k", "v"]] = Field(
        default_factory=list,
        description="[k, v]: keys and values merged and shared (one KV cache); [] = expert-KV.",
    )
    router: Router = Field(
        default_factory=lambda: SoftRouter(kind="soft"),
        description="soft (every expert, BAM's choice) or topk.",
    )


class LayerRule(Node):
    """Which layers become MoE and how; later rules override earlier ones, per part."""

    select: Select = Field(
        description="all | [0, 2, 5] | {from: 0, to: 12, every: 2} (to exclusive)."
    )
    ffn: FFNMix | None = Field(None, description="The FFN mixture of the selected layers.")
    attention: AttentionMix | None = Field(
        None, description="Attention experts (BAM) of the selected layers."
    )

    @model_validator(mode="after")
    def _has_a_mixture(self) -> LayerRule:
        if self.ffn is None and self.attention is None:
            raise PydanticCustomError(
                "empty_rule", "a layer rule needs 'ffn' or 'attention' (or both)"
            )
        return self


# ----------------------------------------------------------------------------- merge


class MergeFrom(Node):
    """Take every non-expert tensor from one source."""

    from_: SourceName = Field(alias="from", description="The source every tensor comes from.")


class MergeWeights(Node):
    """Weighted mean of the sources' non-expert tensors (weights are normalised)."""

    weights: dict[SourceName, Annotated[StrictFloat, Field(ge=0.0)]] = Field(
        description="source -> weight (>= 0, normalised to sum 1)."
    )

    @model_validator(mode="after")
    def _positive(self) -> MergeWeights:
        if not self.weights or sum(self.weights.values()) <= 0:
            raise PydanticCustomError(
                "zero_weights", "merge weights must name sources and sum to more than 0"
            )
        return self


_merge_tag = _tagger(("merge-average", lambda v: v == "average"),
                     ("merge-weights", _mapping(MergeWeights, "weights")),
                     ("merge-from", _mapping(MergeFrom)))


Merge = Annotated[
    Annotated[Literal["average"], Tag("merge-average")] | Annotated[MergeFrom, Tag("merge-from")] | Annotated[MergeWeights, Tag("merge-weights")],
    Discriminator(
        _merge_tag,
        custom_error_type="invalid_merge",
        custom_error_message="expected 'average', {from: SOURCE} or {weights: {SOURCE: w}}",
    ),
]

# ---------------------------------------------------------------------------- others


class Domain(Node):
    """A routed expert's domain: texts to embed, or a stored embedding vector."""

    texts: str | None = Field(
        None, description="Glob of documents (one per file) embedded with `embed_with`."
    )
    embedding: str | None = Field(
        None, description="A stored vector: .safetensors ([m] or [1, m]) or .npy."
    )
    key: str | None = Field(
        None, description="The tensor to read from an `embedding` safetensors file holding several."
    )
    max_docs: StrictInt = Field(
        64, ge=1, le=MAX_INT, description="Embed at most this many documents (the first, in sorted order)."
    )
    max_tokens: StrictInt = Field(512, ge=1, le=MAX_INT, description="Each document is truncated to this many tokens.")

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        if (self.texts is None) == (self.embedding is None):
            raise PydanticCustomError(
                "domain_kind", "a domain needs exactly one of 'texts' or 'embedding'"
            )
        if self.key is not None and self.embedding is None:
            raise PydanticCustomError("domain_key", "'key' applies to 'embedding' files only")
        return self


TrainName = Literal[
    "all", "router", "experts", "adapters", "attention", "shared", "ffn", "embeddings", "norms"
]
TRAIN_NAMES: tuple[str, ...] = TrainName.__args__  # type: ignore[attr-defined]


class Output(Node):
    """What the build writes."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights dtype; default: the sources' dtype."
    )
    format: Literal["auto", "native", "mixtral", "qwen2_moe", "qwen3_moe"] = Field(
        "auto",
        description="auto: mixtral, qwen2_moe or qwen3_moe when the model is expressible as "
        "one, else native.",
    )
    max_shard_size: ByteSize = Field(
        ByteSize(2_000_000_000), ge=1,
        description="Largest safetensors shard, e.g. 2GB or 500MB.",
    )


class Spec(Node):
    """A mix spec (format version 1)."""

    moecompose: Literal[1] = Field(description="Format version.")
    name: str | None = Field(None, description="Defaults to the file name.")
    seed: StrictInt = Field(0, ge=0, le=MAX_INT, description="Seeds every random initialisation.")
    sources: dict[SourceName, str] = Field(
        min_length=1, description="name -> dense Hugging Face checkpoint folder."
    )
    merge: Merge = Field("average", description="How non-expert tensors are merged.")
    block: Literal["sequential", "parallel"] | None = Field(
        None, description="Block form; default: the sources' (sequential for Llama)."
    )
    domains: dict[SourceName, Domain] | None = Field(
        None, description="Nexus: one domain per routed expert, by source name."
    )
    embed_with: SourceName | None = Field(
        None, description="The source that embeds domain texts (and, by default, router prompts)."
    )
    layers: list[LayerRule] = Field(
        default_factory=list,
        description="Which layers become MoE; later rules override earlier ones, per part.",
    )
    train: list[TrainName] | None = Field(
        None, description="Trainable tensor groups; default: all."
    )
    output: Output = Field(default_factory=Output, description="What the build writes.")

    _origin: Any = PrivateAttr(default=None)

    @property
    def origin(self) -> Origin:
        """Where this spec was read from (an in-memory origin for specs made in Python)."""
        if self._origin is None:
            self._origin = Origin.in_memory()
        return self._origin

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spec):
            return NotImplemented
        return self.to_data() == other.to_data()

    def __hash__(self) -> int:
        return hash(repr(self.to_data()))

    def to_data(self) -> dict[str, Any]:
        """Plain JSON-able data, aliases as written in specs, every default filled in."""
        return self.model_dump(mode="json", by_alias=True)

    def with_(self, changes: dict[str, Any] | None = None, **fields: Any) -> Spec:
        """A re-validated variant. Keys are field names or dotted paths into the spec:

        >>> spec.with_({"layers[0].ffn.router.k": 1}, seed=3)

        Values may be plain data or spec models. Relative source paths keep resolving
        from the original spec's folder.
        """
        data = self.to_data()
        for key, value in {**(changes or {}), **fields}.items():
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True)
            steps = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", key) if p]
            node: Any = data
            for step in steps[:-1]:
                node = node[step]
            node[steps[-1]] = value
        variant = Spec.model_validate(data)
        variant._origin = self._origin
        return variant
