"""Stage 2: a ``Spec`` plus the facts read from its sources' metadata.

Every cross-check between the spec and the checkpoints happens here, before any weight
is read: paths, families, widths, layer counts, vocabularies, tensor shapes, dtypes,
tokenizers, layer selections. Errors point at the spec text that caused them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moecompose.dtypes import CODES, ITEMSIZE, MODEL_DTYPES, NAMES
from moecompose.errors import SourceError, SpecError
from moecompose.sources.checkpoint import ArchFacts, Checkpoint, open_checkpoint
from moecompose.sources.families import FAMILIES, GLOBAL_ROLES, LAYER_ROLES, Family
from moecompose.sources.safetensors_io import TensorEntry
from moecompose.sources.vectors import (
    VectorFileError,
    documents,
    embedding_width,
    files_fingerprint,
)
from moecompose.spec.check import check_spec
from moecompose.spec.origin import DataPath
from moecompose.spec.schema import (
    AuxLoss,
    Domain,
    ExpertsNode,
    LayerRange,
    MergeFrom,
    MergeWeights,
    PromptInit,
    RouterNode,
    Spec,
    expert_sources,
)
from moecompose.text import ranges


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
    router: RouterNode  # a kind that routes FFN experts (check_spec)
    aux_loss: AuxLoss
    rule: int  # index of the spec's layer rule that set it
    kind: ExpertsNode | None = None  # the experts' spec, when not a list of sources
    prompt_source: str | None = None  # the model that embeds the router's prompts


@dataclass(frozen=True)
class AttentionMixture:
    """The resolved mixture of attention (BAM) of one layer."""

    experts: tuple[str, ...]  # one attention expert per source
    share_kv: bool  # k and v merged and shared by every expert (one KV cache)
    router: RouterNode  # a kind that routes attention experts (check_spec)
    rule: int


@dataclass(frozen=True)
class LayerPlanInput:
    index: int
    ffn: FFNMixture | None  # None: the layer stays dense
    attention: AttentionMixture | None = None  # None: ordinary attention


@dataclass(frozen=True)
class ResolvedDomain:
    """A routed expert's domain embedding: where it comes from, and its fingerprint."""

    name: str
    kind: str  # "texts" (embedded by `embed_with`) or "embedding" (a stored vector)
    files: tuple[Path, ...]  # texts: the documents embedded, sorted; embedding: the file
    fingerprint: str  # sha256 over the documents' names and contents, or of the file
    width: int
    matched: int = 1  # texts: files the glob matched (at most max_docs are embedded)
    embed_with: str | None = None
    max_tokens: int = 0
    key: str | None = None  # the tensor of a safetensors embedding file


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
    domains: dict[str, ResolvedDomain] = field(default_factory=dict)

    @property
    def moe_layers(self) -> list[LayerPlanInput]:
        return [layer for layer in self.layers if layer.ffn is not None]


def resolve(spec: Spec, opened: dict[str, Checkpoint] | None = None) -> Resolved:
    """Check ``spec`` against its sources' metadata and gather what planning needs.

    ``opened``: sources already read, by name (e.g. as an artifact recorded them, see
    ``recorded_checkpoint``); they are used instead of reading their paths again.
    """
    check_spec(spec)
    origin = spec.origin
    sources: dict[str, Checkpoint] = {}
    for name, raw in spec.sources.items():
        if opened is not None and name in opened:
            sources[name] = opened[name]
            continue
        try:
            path = spec_path(spec, raw)
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
    if arch.qk_norm:
        for r, rule in enumerate(spec.layers):
            if rule.attention is not None:
                raise SourceError(
                    f"attention experts over {first.family.name} sources are not supported: their "
                    "per-head q/k norms have no place in the mixture of attention yet",
                    location=spec.origin.locate(("layers", r, "attention"), key=True),
                    hint="mix FFNs only for these sources",
                )
    block = spec.block or "sequential"
    if block == "parallel" and arch.norm_placement != "pre":
        raise SourceError(
            f"block: parallel over {first.family.name} sources is not supported: their blocks "
            "normalise each branch's output", location=spec.origin.locate(("block",)),
            hint="leave block unset (the sources' sequential block)")  # every supported family has sequential blocks
    if block == "parallel":
        warnings.append(
            "block: parallel changes the function of the sequential sources; the built "
            "model does not reproduce them before training"
        )
    warnings += _frozen_top1_warnings(layers)
    domains = _domains(spec, sources)
    _check_prompt_sources(spec, sources)
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
        domains=domains,
    )
    return resolved


def spec_path(spec: Spec, raw: str, *, pattern: bool = False) -> Path:
    """A path written in ``spec`` (a source, domain texts, an embedding file), absolute:
    ``~`` expanded, relative to the spec's folder, resolved; a glob ``pattern`` is
    resolved up to its first wildcard. The normalised spec records paths this way, so
    it means the same wherever it is saved."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = spec.origin.base_dir / path
    if not pattern:
        return path.resolve()
    parts = path.parts
    fixed = next((j for j, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    return Path(*parts[:fixed]).resolve().joinpath(*parts[fixed:])


def recorded_checkpoint(
    name: str, recorded: dict[str, str], config: dict[str, Any], tokenizer: dict[str, str]
) -> Checkpoint:
    """Source ``name`` as an artifact recorded it: its path and fingerprint (the plan's
    ``sources[name]``), its facts (the artifact's native ``config``: every source shares
    them), the artifact's ``tokenizer`` file hashes, and the dense tensors those facts
    imply. Re-plans an artifact's spec without reading its sources, which may be gone."""
    family = FAMILIES[config["family"]]
    known = {f.name for f in fields(ArchFacts)}
    arch = ArchFacts(**{
        **{key: value for key, value in config.items() if key in known},
        "model_type": family.model_types[0],
        "qk_norm": config.get("qk_norm") or None,
        "norm_placement": config.get("norm_placement", "pre"),
        "layer_types": tuple(config["layer_types"]) if config.get("layer_types") else None,
        "initializer_range": 0.02,  # not recorded; only Hugging Face configs carry it
    })
    code = CODES[config["dtype"]]
    path = Path(recorded["path"])
    tensors = {}
    for tensor, shape in dense_tensors(arch, family).items():
        size = ITEMSIZE[code] * math.prod(shape)
        tensors[tensor] = TensorEntry(str(path), code, shape, 0, size, tensor)
    return Checkpoint(name, path, family, arch, tensors, tokenizer, recorded["fingerprint"])


def dense_tensors(arch: ArchFacts, family: Family) -> dict[str, tuple[int, ...]]:
    """Every tensor a dense checkpoint of ``family`` with the facts ``arch`` holds, with
    its shape."""
    q_out = arch.num_attention_heads * arch.head_dim
    kv_out = arch.num_key_value_heads * arch.head_dim
    d, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    shapes = {
        "embed": (v, d), "final_norm": (d,), "lm_head": (v, d),
        "attn_norm": (d,), "ffn_norm": (d,), "attn_out_norm": (d,), "ffn_out_norm": (d,),
        "q": (q_out, d), "k": (kv_out, d),
        "v": (kv_out, d), "o": (d, q_out), "q_bias": (q_out,), "k_bias": (kv_out,),
        "v_bias": (kv_out,),
        "q_norm": (arch.head_dim,) if arch.qk_norm == "head" else (q_out,),
        "k_norm": (arch.head_dim,) if arch.qk_norm == "head" else (kv_out,),
        "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
    }
    out: dict[str, tuple[int, ...]] = {}
    for role in GLOBAL_ROLES:
        if role == "lm_head" and arch.tie_word_embeddings:
            continue
        out[family.tensor(role)] = shapes[role]
    for i in range(arch.num_hidden_layers):
        for role in LAYER_ROLES:
            if arch.has_role(role):
                out[family.tensor(role, i)] = shapes[role]
    return out


def _needs_tokenizer(spec: Spec, ckpt: Checkpoint, at: DataPath, what: str) -> None:
    if "tokenizer.json" not in ckpt.tokenizer:
        raise SourceError(
            f"source '{ckpt.name}' has no tokenizer.json, which {what} needs",
            location=spec.origin.locate(at),
            hint="save the model's fast tokenizer into its folder, or use another source",
        )


def _domains(spec: Spec, sources: dict[str, Checkpoint]) -> dict[str, ResolvedDomain]:
    """Expand text globs, fingerprint what will be embedded, and check every width."""
    embedder = sources[spec.embed_with] if spec.embed_with is not None else None
    out: dict[str, ResolvedDomain] = {}
    for name, domain in (spec.domains or {}).items():
        at: DataPath = ("domains", name, "texts" if domain.texts is not None else "embedding")
        try:
            if domain.texts is not None:
                assert embedder is not None  # check_spec requires embed_with for texts
                out[name] = _text_domain(spec, name, domain, embedder, at)
            else:
                out[name] = _stored_domain(spec, name, domain)
        except VectorFileError as exc:  # a file that cannot be read
            raise SourceError(
                f"domain '{name}': {exc}", location=spec.origin.locate(at), hint=exc.hint
            ) from None
    if out:
        _check_domain_widths(spec, out, embedder)
    return out


def _text_domain(
    spec: Spec, name: str, domain: Domain, embedder: Checkpoint, at: DataPath
) -> ResolvedDomain:
    assert domain.texts is not None
    _needs_tokenizer(spec, embedder, ("embed_with",), "embedding domain texts")
    matched = documents(spec_path(spec, domain.texts, pattern=True))
    if not matched:
        raise SpecError(
            f"domain '{name}': texts {domain.texts!r} match no file",
            location=spec.origin.locate(at),
            hint="check the glob; it is relative to the spec's folder (use ** to recurse)",
        )
    files = tuple(matched[: domain.max_docs])
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        raise SpecError(
            f"domain '{name}': document {empty[0]} is empty",
            location=spec.origin.locate(at),
            hint="fill it or remove it; every document is averaged with equal weight",
        )
    return ResolvedDomain(
        name, "texts", files, files_fingerprint(files), embedder.arch.hidden_size,
        len(matched), embedder.name, domain.max_tokens,
    )


def _stored_domain(spec: Spec, name: str, domain: Domain) -> ResolvedDomain:
    assert domain.embedding is not None
    path = spec_path(spec, domain.embedding)
    width = embedding_width(path, domain.key)
    return ResolvedDomain(
        name, "embedding", (path,), files_fingerprint((path,)), width, key=domain.key
    )


def _check_domain_widths(
    spec: Spec, domains: dict[str, ResolvedDomain], embedder: Checkpoint | None
) -> None:
    if embedder is not None and any(d.kind == "texts" for d in domains.values()):
        expected, why = embedder.arch.hidden_size, f"embed_with '{embedder.name}' is that wide"
    else:
        first = next(iter(domains.values()))
        expected, why = first.width, f"domain '{first.name}' is that wide"
    for name, domain in domains.items():
        if domain.width != expected:
            raise SpecError(
                f"domain '{name}': the embedding has width {domain.width}, expected {expected} "
                f"({why})",
                location=spec.origin.locate(("domains", name, domain.kind)),
                hint="every domain embedding must have the same width; re-embed it with the "
                "same model",
            )


def prompt_source(spec: Spec, init: PromptInit) -> str:
    """The model whose hidden states give prompt-initialised router rows."""
    return init.source or spec.embed_with or next(iter(spec.sources))


def _check_prompt_sources(spec: Spec, sources: dict[str, Checkpoint]) -> None:
    for r, rule in enumerate(spec.layers):
        router = rule.ffn.router if rule.ffn is not None else None
        if isinstance(init := getattr(router, "init", None), PromptInit):
            at: DataPath = ("layers", r, "ffn", "router", "init")
            name = prompt_source(spec, init)
            _needs_tokenizer(spec, sources[name], at, "embedding router prompts")


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
        for tensor, shape in dense_tensors(ckpt.arch, ckpt.family).items():
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
            if NAMES[entry.dtype] not in MODEL_DTYPES:
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
            attn = AttentionMixture(
                tuple(rule.attention.experts), bool(rule.attention.share), rule.attention.router, r
            )
            for i in indices:
                attention[i] = attn
        if rule.ffn is None:
            continue
        written = rule.ffn.experts
        experts = tuple(Expert(name, drop) for name, drop in expert_sources(written))
        kind = written if isinstance(written, ExpertsNode) else None
        router = rule.ffn.router
        init = getattr(router, "init", None)
        prompts = prompt_source(spec, init) if isinstance(init, PromptInit) else None
        mixture = FFNMixture(
            experts, rule.ffn.shared, router, rule.ffn.aux_loss, r, kind, prompts
        )
        for i in indices:
            ffn[i] = mixture
    return [LayerPlanInput(i, ffn.get(i), attention.get(i)) for i in range(n_layers)]


def _frozen_top1_warnings(layers: list[LayerPlanInput]) -> list[str]:
    """A top-1 router that renormalises weighs its one expert 1.0 for every token, so the
    LM loss gives it no gradient: it learns from the aux loss alone (ALGORITHMS.md)."""
    out = []
    for part in ("ffn", "attention"):
        chosen = tuple(
            layer.index for layer in layers
            if (mix := getattr(layer, part)) is not None and getattr(mix.router, "k", None) == 1
            and getattr(mix.router, "normalize", False)
        )
        if chosen:
            out.append(
                f"layers {ranges(chosen)}: the {part} router is top-1 with normalize: true, so "
                "its expert always gets weight 1.0 and training gives the router no gradient "
                "from the LM loss; write normalize: false to train it (Switch)"
            )
    return out
