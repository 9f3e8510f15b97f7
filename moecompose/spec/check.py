"""Checks a spec can pass without reading any source: names refer to sources and options
fit together."""

from __future__ import annotations

from collections.abc import Callable

from moecompose.errors import SpecError, did_you_mean, one_of
from moecompose.spec import schema
from moecompose.spec.origin import DataPath

Bad = Callable[..., None]
SourceCheck = Callable[..., None]


def check_spec(spec: schema.Spec) -> None:
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

    if isinstance(spec.merge, schema.MergeFrom):
        source(("merge", "from"), spec.merge.from_, "merge source")
    elif isinstance(spec.merge, schema.MergeWeights):
        for name in spec.merge.weights:
            source(("merge", "weights", name), name, "merge weight source", key=True)

    if spec.embed_with is not None:
        source(("embed_with",), spec.embed_with, "embed_with")

    for i, rule in enumerate(spec.layers):
        at: DataPath = ("layers", i)
        if rule.attention is not None:
            _check_attention(rule.attention, (*at, "attention"), source, bad)
        if rule.ffn is not None:
            _check_ffn(rule.ffn, (*at, "ffn"), spec, source, bad)
    _check_domains(spec, source, bad)

    if spec.train is not None and not spec.train:
        bad(("train",), "'train' is empty", "omit it to train everything, or name groups")

    if problems:
        origin = spec.origin
        located = [(origin.locate(p, key=k), m, h) for p, m, h, k in problems]
        located.sort(key=lambda t: (t[0].line or 0, t[0].column or 0))
        location, message, hint = located[0]
        raise SpecError(message, location=location, hint=hint)


def _check_ffn(ffn: schema.FFNMix, at: DataPath, spec: schema.Spec, source: SourceCheck, bad: Bad) -> None:
    origin = spec.origin
    experts = ffn.experts
    if isinstance(experts, list) and not experts:
        bad((*at, "experts"), "'experts' is empty", "list at least one source")
        return
    for below, name, what in schema.named_sources(experts):
        source((*at, "experts", *below), name, what)
    count = len(schema.expert_sources(experts))
    if ffn.shared is not None:
        source((*at, "shared"), ffn.shared, "shared expert")

    router = ffn.router
    if ffn.granularity > 1:
        _check_granularity(ffn, at, bad)
    if not _routes(router, "ffn", at, bad):
        return
    if isinstance(router, schema.TokenMixingRouter):
        if isinstance(experts, schema.ExpertsNode) and not experts.own_ffn:
            bad((*at, "router", "kind"), f"token mixing needs FFN experts, not {experts.title}",
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
    if isinstance(router, schema.NexusRouter):
        _check_nexus(ffn, at, spec, bad)
    elif isinstance(init := getattr(router, "init", None), schema.PromptInit):
        _check_prompt_init(init, ffn, (*at, "router", "init"), source, bad)
    k = getattr(router, "k", None)
    if k is not None and k > count:
        plural = "s" if count > 1 else ""
        written = (*at, "router", "k") in origin.keys
        if written:
            bad((*at, "router", "k"),
                f"k = {k} but the layer has only {count} expert{plural}",
                f"use k <= {count}")
        else:
            bad((*at, "experts"),
                f"the default router k = {k} but the layer has only {count} "
                f"expert{plural}",
                f"add router: {{kind: topk, k: {count}}} or list more experts")


ROUTED = {"ffn": "FFN experts", "attention": "attention experts"}


def _routes(router: schema.RouterNode, part: str, at: DataPath, bad: Bad) -> bool:
    """Whether ``router`` can route the ``part`` mixture (``ffn``, ``attention``); if not,
    report it with the kinds that can."""
    if part in router.routes:
        return True
    can = [f"kind: {kind}" for node, kind in zip(schema.ROUTER_NODES, schema.ROUTER_KINDS)
           if part in node.routes]
    does = " and ".join(ROUTED[p] for p in router.routes)
    bad((*at, "router", "kind"),
        f"router kind '{router.kind}' cannot route {ROUTED[part]} "
        f"({router.kind.replace('_', ' ')} routing is for {does})",
        f"use {' or '.join(can)}")
    return False


def _check_granularity(ffn: schema.FFNMix, at: DataPath, bad: Bad) -> None:
    """Fine-grained experts split FFN experts and replicate linear top-k router rows."""
    g = ffn.granularity
    if isinstance(ffn.experts, schema.ExpertsNode) and not ffn.experts.own_ffn:
        bad((*at, "granularity"),
            f"granularity {g} splits FFN experts, but {ffn.experts.title} have no FFN of "
            "their own to split",
            "remove 'granularity', or use experts: {copy: SOURCE, count: N} or a list of sources")
        return
    why = ffn.router.not_fine_grained
    if why is not None:
        bad((*at, "granularity"),
            f"granularity {g} needs router kind: topk, not {ffn.router.kind}: {why}",
            "remove 'granularity', or use router: {kind: topk}")


def _distinct_experts(ffn: schema.FFNMix, at: DataPath, what: str, bad: Bad) -> list[str] | None:
    """The layer's experts when they are a list of distinct sources; else report why not."""
    if not isinstance(ffn.experts, list):
        bad((*at, "experts"), f"{what} needs a list of distinct expert sources",
            "list the sources, e.g. experts: [code, law]")
        return None
    seen: set[str] = set()
    for j, name in enumerate(ffn.experts):
        if name in seen:
            bad((*at, "experts", j), f"expert '{name}' is listed twice; {what} tells experts "
                "apart by their source", "list each source once")
            return None
        seen.add(name)
    return list(ffn.experts)


def _check_nexus(ffn: schema.FFNMix, at: DataPath, spec: schema.Spec, bad: Bad) -> None:
    experts = _distinct_experts(ffn, at, "the nexus router", bad)
    if experts is None:
        return
    missing = [e for e in experts if e not in (spec.domains or {})]
    if missing:
        names = ", ".join(f"'{e}'" for e in missing)
        example = f"{missing[0]}: {{texts: ./data/{missing[0]}/*.txt}}"
        bad((*at, "router", "kind"),
            f"the nexus router needs a domain for every routed expert; {names} has none",
            f"add domains: {{{example}}} (or {{embedding: FILE}})")


def _check_prompt_init(init: schema.PromptInit, ffn: schema.FFNMix, at: DataPath, source: SourceCheck,
                       bad: Bad) -> None:
    if init.source is not None:
        source((*at, "source"), init.source, "prompt source")
    experts = _distinct_experts(ffn, at[:-2], "a prompt-initialised router", bad)
    if experts is None:
        return
    for field_name, table in (("prompts", init.prompts), ("negative", init.negative or {})):
        for name, prompts in table.items():
            if name not in experts:
                bad((*at, field_name, name), f"'{name}' is not an expert of this layer",
                    did_you_mean(name, experts) or f"experts: {one_of(experts)}", key=True)
            elif not prompts:
                bad((*at, field_name, name), f"no {field_name} prompts for expert '{name}'",
                    "give at least one prompt")
    missing = [e for e in experts if e not in init.prompts]
    if missing:
        bad((*at, "prompts"), f"no prompts for expert{'s' if len(missing) > 1 else ''} "
            + ", ".join(f"'{e}'" for e in missing),
            "every expert's router row comes from its prompts; add them")


def _check_domains(spec: schema.Spec, source: SourceCheck, bad: Bad) -> None:
    if spec.domains is None:
        return
    routed = [
        name
        for rule in spec.layers
        if rule.ffn is not None and isinstance(rule.ffn.router, schema.NexusRouter)
        and isinstance(rule.ffn.experts, list)
        for name in rule.ffn.experts
    ]
    for name, domain in spec.domains.items():
        at: DataPath = ("domains", name)
        if name not in spec.sources:
            source(at, name, "domain", key=True)
            continue
        if name not in routed:
            hint = (f"domains belong to the routed experts of nexus layers ({one_of(routed)})"
                    if routed else "domains are used by layers with router: {kind: nexus}")
            bad(at, f"domain '{name}' is not a routed expert of any nexus layer", hint, key=True)
        if domain.texts is not None and spec.embed_with is None:
            bad((*at, "texts"), "domain texts need a model to embed them",
                "add embed_with: SOURCE (e.g. the seed model), or give a stored embedding")


def _check_attention(attn: schema.AttentionMix, at: DataPath, source: SourceCheck, bad: Bad) -> None:
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
    if isinstance(getattr(router, "init", None), schema.PromptInit):
        bad((*at, "router", "init"), "prompt-initialised rows are for FFN routers",
            "use init: random or zeros for the attention router")
    if not _routes(router, "attention", at, bad):
        return
    k = getattr(router, "k", None)
    if k is not None and k > len(attn.experts):
        bad((*at, "router", "k"),
            f"k = {k} but the layer has only {len(attn.experts)} attention experts",
            f"use k <= {len(attn.experts)}")
