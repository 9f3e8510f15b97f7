"""Stage 2: a ``Spec`` plus the facts read from its sources' metadata.

Every cross-check between the spec and the checkpoints happens here, before any weight
is read: paths, families, widths, layer counts, vocabularies, tensor shapes, dtypes,
tokenizers, layer selections. Errors point at the spec text that caused them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecompose.errors import SourceError, SpecError
from moecompose.sources.checkpoint import ArchFacts, Checkpoint, open_checkpoint
from moecompose.sources.families import GLOBAL_ROLES, LAYER_ROLES, Family
from moecompose.spec.check import check_spec
from moecompose.spec.origin import DataPath
from moecompose.spec.schema import (
    AdapterExperts,
    AuxLoss,
    CopyExperts,
    LayerRange,
    MergeFrom,
    MergeWeights,
    SoftRouter,
    Spec,
    TokenMixingRouter,
    TopKRouter,
)


@dataclass(frozen=True)
class Expert:
    """One FFN expert: the source whose FFN it copies, and its drop-upcycling rate."""

    source: str
    drop: float = 0.0


@dataclass(frozen=True)
class FFNMixture:
    """The resolved FFN mixture of one layer."""

    experts: tuple[Expert, ...]  # for adapters: the shared FFN's source, once per expert
    shared: str | None
    router: TopKRouter | TokenMixingRouter
    aux_loss: AuxLoss
    rule: int  # index of the spec's layer rule that set it
    adapters: AdapterExperts | None = None  # PESC: experts are adapters on one shared FFN


@dataclass(frozen=True)
class AttentionMixture:
    """The resolved mixture of attention (BAM) of one layer."""

    experts: tuple[str, ...]  # one attention expert per source
    share_kv: bool  # k and v merged and shared by every expert (one KV cache)
    router: SoftRouter | TopKRouter
    rule: int


@dataclass(frozen=True)
class LayerPlanInput:
    index: int
    ffn: FFNMixture | None  # None: the layer stays dense
    attention: AttentionMixture | None = None  # None: ordinary attention


@dataclass
class Resolved:
    spec: Spec
    name: str
    sources: dict[str, Checkpoint]
    family: Family
    arch: ArchFacts
    layers: list[LayerPlanInput]
    merge_weights: dict[str, float]  # normalised, sums to 1
    dtype: str
    train: frozenset[str] | None  # None: everything trainable
    block: str = "sequential"
    warnings: list[str] = field(default_factory=list)

    @property
    def moe_layers(self) -> list[LayerPlanInput]:
        return [layer for layer in self.layers if layer.ffn is not None]


def resolve(spec: Spec) -> Resolved:
    """Check ``spec`` against its sources' metadata and gather what planning needs."""
    check_spec(spec)
    origin = spec.origin
    sources: dict[str, Checkpoint] = {}
    for name, raw in spec.sources.items():
        try:
            path = Path(raw).expanduser()
            if not path.is_absolute():
                path = origin.base_dir / path
            path = path.resolve()
            path.exists()
        except (OSError, RuntimeError, ValueError) as exc:  # unknown ~user, NUL byte, loops
            raise SourceError(
                f"source '{name}': cannot use path {raw!r}: {exc}",
                location=origin.locate(("sources", name)),
                hint="check the path in 'sources'",
            ) from None
        try:
            sources[name] = open_checkpoint(name, path)
        except SourceError as exc:
            exc.location = exc.location or origin.locate(("sources", name))
            raise
    first = next(iter(sources.values()))
    _check_compatible(spec, sources)
    _check_tensors(spec, sources)
    warnings = _check_tokenizers(spec, sources)
    arch = first.arch
    dtype = _output_dtype(spec, sources)
    layers = _layers(spec, arch.num_hidden_layers)
    block = spec.block or "sequential"  # every supported family has sequential blocks
    if block == "parallel":
        warnings.append(
            "block: parallel changes the function of the sequential sources; the built "
            "model does not reproduce them before training"
        )
    name = spec.name or (Path(origin.file).stem if origin.file else "moecompose-model")
    resolved = Resolved(
        spec=spec,
        name=name,
        sources=sources,
        family=first.family,
        arch=arch,
        layers=layers,
        merge_weights=_merge_weights(spec),
        dtype=dtype,
        train=frozenset(spec.train) if spec.train is not None and "all" not in spec.train else None,
        block=block,
        warnings=warnings,
    )
    return resolved


def _check_compatible(spec: Spec, sources: dict[str, Checkpoint]) -> None:
    names = list(sources)
    ref = sources[names[0]]
    for name in names[1:]:
        other = sources[name]
        for fact in ArchFacts.COMPATIBILITY:
            a, b = getattr(ref.arch, fact), getattr(other.arch, fact)
            if a != b:
                raise SourceError(
                    f"sources '{ref.name}' and '{name}' differ in {fact}: {a!r} vs {b!r}",
                    location=spec.origin.locate(("sources", name)),
                    hint="all sources must share one architecture",
                )


def _check_tensors(spec: Spec, sources: dict[str, Checkpoint]) -> None:
    for name, ckpt in sources.items():
        arch, fam = ckpt.arch, ckpt.family
        q_out = arch.num_attention_heads * arch.head_dim
        kv_out = arch.num_key_value_heads * arch.head_dim
        d, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
        shapes = {
            "embed": (v, d), "final_norm": (d,), "lm_head": (v, d),
            "attn_norm": (d,), "ffn_norm": (d,), "q": (q_out, d), "k": (kv_out, d),
            "v": (kv_out, d), "o": (d, q_out), "q_bias": (q_out,), "k_bias": (kv_out,),
            "v_bias": (kv_out,), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
        }
        wanted: list[tuple[str, tuple[int, ...]]] = []
        for role in GLOBAL_ROLES:
            if role == "lm_head" and arch.tie_word_embeddings:
                continue
            wanted.append((fam.tensor(role), shapes[role]))
        for i in range(arch.num_hidden_layers):
            for role in LAYER_ROLES:
                if role.endswith("_bias") and not arch.attention_bias:
                    continue
                wanted.append((fam.tensor(role, i), shapes[role]))
        for tensor, shape in wanted:
            entry = ckpt.tensors.get(tensor)
            where = spec.origin.locate(("sources", name))
            if entry is None:
                raise SourceError(
                    f"source '{name}' lacks tensor '{tensor}'", location=where,
                    hint="the checkpoint is incomplete or not of its config's family",
                )
            if entry.shape != shape:
                raise SourceError(
                    f"source '{name}': tensor '{tensor}' has shape {list(entry.shape)}, "
                    f"its config implies {list(shape)}",
                    location=where,
                    hint="config.json does not match the weights; re-save the checkpoint",
                )
            if entry.dtype not in ("F32", "BF16", "F16"):
                raise SourceError(
                    f"source '{name}': tensor '{tensor}' has dtype {entry.dtype}",
                    location=where, hint="only float32, bfloat16 and float16 weights can be merged",
                )


def _check_tokenizers(spec: Spec, sources: dict[str, Checkpoint]) -> list[str]:
    names = list(sources)
    ref = sources[names[0]]
    for name in names[1:]:
        other = sources[name]
        for file in sorted(set(ref.tokenizer) | set(other.tokenizer)):
            if ref.tokenizer.get(file) != other.tokenizer.get(file):
                state = "differs" if file in ref.tokenizer and file in other.tokenizer else "is missing in one"
                raise SourceError(
                    f"tokenizers of '{ref.name}' and '{name}' differ: {file} {state}",
                    location=spec.origin.locate(("sources", name)),
                    hint=f"experts must share one tokenizer; copy the tokenizer files of "
                    f"'{ref.name}' into '{name}'",
                )
    if not ref.tokenizer:
        return ["the sources carry no tokenizer files; the artifact will have none"]
    return []


def _output_dtype(spec: Spec, sources: dict[str, Checkpoint]) -> str:
    if spec.output.dtype is not None:
        return spec.output.dtype
    dtypes = {name: ckpt.dtype for name, ckpt in sources.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"'{n}' is {t}" for n, t in dtypes.items())
        raise SpecError(
            f"sources have different dtypes: {listed}",
            location=spec.origin.locate(("sources",), key=True),
            hint="set output.dtype to the dtype the model should have",
        )
    return next(iter(dtypes.values()))


def _merge_weights(spec: Spec) -> dict[str, float]:
    if isinstance(spec.merge, MergeFrom):
        return {spec.merge.from_: 1.0}
    if isinstance(spec.merge, MergeWeights):
        total = sum(spec.merge.weights.values())
        return {n: w / total for n, w in spec.merge.weights.items() if w > 0}
    return {name: 1.0 / len(spec.sources) for name in spec.sources}


def _selected(select: object, n_layers: int, at: DataPath, spec: Spec) -> list[int]:
    if select == "all":
        return list(range(n_layers))
    if isinstance(select, LayerRange):
        end = n_layers if select.to is None else select.to
        if end > n_layers:
            raise SpecError(
                f"layer range ends at {end} but the sources have {n_layers} layers",
                location=spec.origin.locate((*at, "to")),
                hint=f"use to: {n_layers} or less; 'to' is exclusive",
            )
        if select.from_ >= n_layers:
            raise SpecError(
                f"layer range starts at {select.from_} but the sources have {n_layers} layers",
                location=spec.origin.locate((*at, "from")),
                hint=f"layers are numbered 0 to {n_layers - 1}",
            )
        return list(range(select.from_, end, select.every))
    assert isinstance(select, list)
    for j, index in enumerate(select):
        if index >= n_layers:
            raise SpecError(
                f"layer {index} does not exist: the sources have {n_layers} layers",
                location=spec.origin.locate((*at, j)),
                hint=f"use indices 0 to {n_layers - 1}",
            )
    seen: set[int] = set()
    for j, index in enumerate(select):
        if index in seen:
            raise SpecError(
                f"layer {index} is listed twice",
                location=spec.origin.locate((*at, j)),
                hint="list each layer once",
            )
        seen.add(index)
    return sorted(select)


def _layers(spec: Spec, n_layers: int) -> list[LayerPlanInput]:
    ffn: dict[int, FFNMixture] = {}
    attention: dict[int, AttentionMixture] = {}
    for r, rule in enumerate(spec.layers):
        indices = _selected(rule.select, n_layers, ("layers", r, "select"), spec)
        if rule.attention is not None:
            router = rule.attention.router
            assert isinstance(router, (SoftRouter, TopKRouter))  # check_spec refuses the others
            attn = AttentionMixture(
                tuple(rule.attention.experts), bool(rule.attention.share), router, r
            )
            for i in indices:
                attention[i] = attn
        if rule.ffn is None:
            continue
        experts_spec = rule.ffn.experts
        adapters = None
        if isinstance(experts_spec, CopyExperts):
            experts = tuple(Expert(experts_spec.copy_, experts_spec.drop) for _ in range(experts_spec.count))
        elif isinstance(experts_spec, AdapterExperts):
            adapters = experts_spec
            experts = tuple(Expert(experts_spec.adapters) for _ in range(experts_spec.count))
        else:
            experts = tuple(Expert(name) for name in experts_spec)
        router = rule.ffn.router
        assert isinstance(router, (TopKRouter, TokenMixingRouter))  # check_spec refuses others
        mixture = FFNMixture(experts, rule.ffn.shared, router, rule.ffn.aux_loss, r, adapters)
        for i in indices:
            ffn[i] = mixture
    return [LayerPlanInput(i, ffn.get(i), attention.get(i)) for i in range(n_layers)]
