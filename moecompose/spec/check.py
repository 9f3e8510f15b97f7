"""Checks a spec can pass without reading any source: names refer to sources, options
fit together, and features this version cannot build yet are refused, never ignored."""

from __future__ import annotations

from collections.abc import Callable

from moecompose.errors import SpecError, did_you_mean, one_of
from moecompose.spec.origin import DataPath, Origin
from moecompose.spec.schema import (
    AdapterExperts,
    AttentionMix,
    CopyExperts,
    FFNMix,
    MergeFrom,
    MergeWeights,
    SoftRouter,
    Spec,
    TokenMixingRouter,
    TopKRouter,
)

NOT_YET = "not supported by this version of moecompose"

Bad = Callable[..., None]
SourceCheck = Callable[..., None]


def check_spec(spec: Spec) -> None:
    """Raise a located ``SpecError`` for the first problem found, in document order."""
    problems: list[tuple[DataPath, str, str | None, bool]] = []

    def bad(path: DataPath, message: str, hint: str | None = None, key: bool = False) -> None:
        problems.append((path, message, hint, key))

    def source(path: DataPath, name: str, role: str, key: bool = False) -> None:
        if name not in spec.sources:
            hint = did_you_mean(name, spec.sources) or (
                f"add it to 'sources' or use one of {one_of(spec.sources)}"
            )
            bad(path, f"{role} '{name}' is not defined in 'sources'", hint, key)

    if isinstance(spec.merge, MergeFrom):
        source(("merge", "from"), spec.merge.from_, "merge source")
    elif isinstance(spec.merge, MergeWeights):
        for name in spec.merge.weights:
            source(("merge", "weights", name), name, "merge weight source", key=True)

    if spec.domains is not None:
        bad(("domains",), f"'domains' are {NOT_YET}",
            "remove the 'domains' section; it comes with the nexus router", key=True)
    if spec.embed_with is not None:
        bad(("embed_with",), f"'embed_with' is {NOT_YET}", "remove it", key=True)

    for i, rule in enumerate(spec.layers):
        at: DataPath = ("layers", i)
        if rule.attention is not None:
            _check_attention(rule.attention, (*at, "attention"), source, bad)
        if rule.ffn is not None:
            _check_ffn(rule.ffn, (*at, "ffn"), spec.origin, source, bad)

    if spec.train is not None and not spec.train:
        bad(("train",), "'train' is empty", "omit it to train everything, or name groups")

    if problems:
        origin = spec.origin
        located = [(origin.locate(p, key=k), m, h) for p, m, h, k in problems]
        located.sort(key=lambda t: (t[0].line or 0, t[0].column or 0))
        location, message, hint = located[0]
        raise SpecError(message, location=location, hint=hint)


def _check_ffn(ffn: FFNMix, at: DataPath, origin: Origin, source: SourceCheck, bad: Bad) -> None:
    experts = ffn.experts
    if isinstance(experts, list):
        if not experts:
            bad((*at, "experts"), "'experts' is empty", "list at least one source")
            return
        for j, name in enumerate(experts):
            source((*at, "experts", j), name, "expert")
        count = len(experts)
    elif isinstance(experts, CopyExperts):
        source((*at, "experts", "copy"), experts.copy_, "copy source")
        count = experts.count
    else:
        source((*at, "experts", "adapters"), experts.adapters, "adapter source")
        count = experts.count
    if ffn.shared is not None:
        source((*at, "shared"), ffn.shared, "shared expert")

    router = ffn.router
    if isinstance(router, TokenMixingRouter):
        if isinstance(experts, AdapterExperts):
            bad((*at, "router", "kind"), "token mixing needs FFN experts, not adapters",
                "use experts: {copy: SOURCE, count: N} or a list of sources")
        if ffn.shared is not None:
            bad((*at, "shared"), "a shared expert cannot be combined with token mixing",
                "remove 'shared'")
        if router.group_size < 2:
            bad((*at, "router", "group_size"),
                f"group_size = {router.group_size}: token mixing needs groups of at least 2",
                "the paper uses 32 to 128")
        elif router.batch_size is not None and router.group_size > router.batch_size:
            bad((*at, "router", "group_size"),
                f"group_size = {router.group_size} is larger than batch_size = {router.batch_size}",
                "groups are formed across the sequences of one batch; use group_size <= batch_size")
        return
    if not isinstance(router, TopKRouter):
        bad((*at, "router", "kind"), f"router kind '{router.kind}' is {NOT_YET}",
            "use kind: topk or kind: token_mixing")
        return
    if router.k > count:
        plural = "s" if count > 1 else ""
        written = (*at, "router", "k") in origin.keys
        if written:
            bad((*at, "router", "k"),
                f"k = {router.k} but the layer has only {count} expert{plural}",
                f"use k <= {count}")
        else:
            bad((*at, "experts"),
                f"the default router k = {router.k} but the layer has only {count} "
                f"expert{plural}",
                f"add router: {{kind: topk, k: {count}}} or list more experts")


def _check_attention(attn: AttentionMix, at: DataPath, source: SourceCheck, bad: Bad) -> None:
    if not attn.experts:
        bad((*at, "experts"), "attention 'experts' is empty", "list at least one source")
        return
    for j, name in enumerate(attn.experts):
        source((*at, "experts", j), name, "attention expert")
    if attn.share and sorted(set(attn.share)) != ["k", "v"]:
        bad((*at, "share"), f"share {list(attn.share)}: keys and values are shared together",
            "use share: [k, v] (one KV cache) or omit it (each expert its own k, v)")
    elif attn.share and len(attn.experts) < 2:
        bad((*at, "share"), "share needs at least two attention experts",
            "omit 'share' for a single attention expert")
    router = attn.router
    if not isinstance(router, (SoftRouter, TopKRouter)):
        bad((*at, "router", "kind"),
            f"router kind '{router.kind}' cannot route attention experts",
            "use kind: soft (BAM's choice) or kind: topk")
    elif isinstance(router, TopKRouter) and router.k > len(attn.experts):
        bad((*at, "router", "k"),
            f"k = {router.k} but the layer has only {len(attn.experts)} attention experts",
            f"use k <= {len(attn.experts)}")
