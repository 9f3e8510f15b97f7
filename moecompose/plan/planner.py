"""Stage 3: ``Resolved -> Plan``, a pure function. One recipe per output tensor."""

from __future__ import annotations

import hashlib
from typing import Any

from moecompose import formats
from moecompose.dtypes import nbytes
from moecompose.errors import SpecError
from moecompose.formats import Format, MoEShape
from moecompose.formats.native import model_config, native_names
from moecompose.model.config import (
    AttentionConfig,
    AuxLossConfig,
    DenseAttentionConfig,
    DenseFFNConfig,
    FFNConfig,
    LayerConfig,
    MoAAttentionConfig,
    ModelConfig,
    MoERouterConfig,
    NexusRouterConfig,
    RoutedFFNConfig,
    SharedExpertConfig,
    ffn_config,
    router_config,
)
from moecompose.plan.recipe import Plan, PlannedTensor, Recipe, TensorRef, Totals
from moecompose.resolve import (
    AttentionMixture,
    FFNMixture,
    Resolved,
    ResolvedDomain,
    spec_path,
)
from moecompose.sources.families import Family
from moecompose.spec.schema import (
    ExpertsNode,
    NexusRouter,
    PromptInit,
    RouterNode,
    TokenMixingRouter,
)
from moecompose.text import ranges

FLOPS_CONTEXT = 2048
PROJECTIONS = ("gate", "up", "down")
ATTENTION_ROLES = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm")
TEMPERATURE = "model.layers.{i}.mlp.router.temperature"
NEXUS_DOMAINS = "model.layers.{i}.mlp.router.domain_embeddings"
NEXUS_W1 = "model.layers.{i}.mlp.router.w1.weight"
NEXUS_W2 = "model.layers.{i}.mlp.router.w2.weight"
FROZEN_GROUPS = frozenset({"domains"})  # buffers: stored, never trained
MOA_ROUTER = "model.layers.{i}.self_attn.router.weight"
MOA_EXPERTS = {
    "q": "model.layers.{i}.self_attn.experts.q_proj",
    "k": "model.layers.{i}.self_attn.experts.k_proj",
    "v": "model.layers.{i}.self_attn.experts.v_proj",
    "o": "model.layers.{i}.self_attn.experts.o_proj",
    "q_bias": "model.layers.{i}.self_attn.experts.q_bias",
    "k_bias": "model.layers.{i}.self_attn.experts.k_bias",
    "v_bias": "model.layers.{i}.self_attn.experts.v_bias",
}
FFN_ROLE = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for one random draw, stable across runs, platforms and Python versions."""
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def granularity(resolved: Resolved, mix: FFNMixture) -> int:
    """G of the layer rule that made ``mix``: each FFN expert is G fine-grained experts."""
    ffn = resolved.spec.layers[mix.rule].ffn
    assert ffn is not None
    return ffn.granularity


def moe_shape(resolved: Resolved) -> MoEShape:
    """The MoE layers as the model has them: fine-grained experts counted one by one, k x G."""
    moe = [layer for layer in resolved.layers if layer.ffn is not None]
    mixtures = [(m, granularity(resolved, m)) for layer in moe if (m := layer.ffn) is not None]
    kinds = {_expert_kind(m) for m, _ in mixtures} - {"topk"}
    if len({g for _, g in mixtures}) > 1:  # the formats' configs have one expert width
        kinds.add("MoE layers differ in granularity (expert width)")
    return MoEShape(
        moe_layers=tuple(layer.index for layer in moe),
        dense_layers=tuple(layer.index for layer in resolved.layers if layer.ffn is None),
        num_experts=frozenset(len(m.experts) * g for m, g in mixtures),
        top_k=frozenset(getattr(m.router, "k", 0) * g for m, g in mixtures),
        normalize=frozenset(getattr(m.router, "normalize", True) for m, _ in mixtures),
        unexpressible=frozenset(kinds),
        shared=frozenset(m.shared is not None for m, _ in mixtures),
        attention_layers=tuple(x.index for x in resolved.layers if x.attention is not None),
        block=resolved.block,
    )


def choose_format(resolved: Resolved, shape: MoEShape) -> tuple[str, str]:
    """(format, why) for the spec's ``output.format``; an impossible request is an error."""
    asked = resolved.spec.output.format
    if asked != "auto":
        why_not = formats.get(asked).blockers(resolved.arch, shape, asked=True)
        if why_not:
            raise SpecError(
                f"format '{asked}' cannot express this model: {'; '.join(why_not)}",
                location=resolved.spec.origin.locate(("output", "format")),
                hint="use format: native, or auto to pick the best format that fits",
            )
        return asked, "asked for in the spec"
    reasons = []
    for fmt in formats.tried_by_auto():
        why_not = fmt.blockers(resolved.arch, shape, asked=False)
        if not why_not:
            reasons.append(f"the model is expressible as {fmt.name}")
            return fmt.name, "auto: " + "; ".join(reasons)
        reasons.append(f"not {fmt.name}: {why_not[0]}")
    return "native", "auto: " + "; ".join(reasons)


class _Planner:
    def __init__(self, resolved: Resolved, fmt: str) -> None:
        self.r = resolved
        self.format: Format = formats.get(fmt)
        self.layout = self.format.layout
        self.family: Family = resolved.family
        self.seed = resolved.spec.seed
        self.dtype = resolved.dtype
        self.tensors: list[PlannedTensor] = []
        self.rows: list[dict[str, Any]] = []

    # -- helpers
    def add(self, name: str, shape: tuple[int, ...], recipe: Recipe, group: str,
            layer: int | None = None, active: float = 1.0) -> None:
        train = self.r.train
        trainable = group not in FROZEN_GROUPS and (train is None or group in train)
        self.tensors.append(
            PlannedTensor(name, shape, self.dtype, recipe, trainable, group, layer, active)
        )

    def source_shape(self, tensor: str) -> tuple[int, ...]:
        first = next(iter(self.r.sources.values()))
        return first.tensors[tensor].shape

    def merged(self, role: str, layer: int | None = None) -> Recipe:
        tensor = self.family.tensor(role, layer)
        weights = self.r.merge_weights
        inputs = tuple(TensorRef(src, tensor) for src in weights)
        if len(inputs) == 1:
            return Recipe("copy", inputs)
        if len(set(weights.values())) == 1:
            return Recipe("mean", inputs)
        return Recipe("weighted", inputs, {"weights": list(weights.values())})

    def add_merged(self, role: str, group: str, layer: int | None = None) -> None:
        tensor = self.family.tensor(role, layer)
        self.add(tensor, self.source_shape(tensor), self.merged(role, layer), group, layer)

    # -- the model
    def run(self) -> None:
        arch = self.r.arch
        self.add_merged("embed", "embeddings")
        for layer in self.r.layers:
            i = layer.index
            self.add_merged("attn_norm", "norms", i)
            if layer.attention is None:
                for role in ATTENTION_ROLES:
                    if arch.has_role(role):
                        self.add_merged(role, "attention", i)
            else:
                self.moa(i, layer.attention)
            if arch.has_role("attn_out_norm"):
                self.add_merged("attn_out_norm", "norms", i)
            self.add_merged("ffn_norm", "norms", i)
            if layer.ffn is None:
                for p in PROJECTIONS:
                    self.add_merged(FFN_ROLE[p], "ffn", i)
                self.rows.append({"layer": i, "ffn": "dense", "merge": self.merged("ffn_up", i).summary()})
            else:
                self.moe(i, layer.ffn)
            if arch.has_role("ffn_out_norm"):
                self.add_merged("ffn_out_norm", "norms", i)
            self.rows[-1]["attention"] = _attention_row(layer.attention)
        self.add_merged("final_norm", "norms")
        if not arch.tie_word_embeddings:
            self.add_merged("lm_head", "embeddings")

    def router_recipe(self, router: RouterNode, *key: object) -> Recipe:
        """The initialisation of a linear router's weight, from its `init` and `init_std`."""
        assert not isinstance(router.init, PromptInit)  # the FFN router plans prompt rows
        if router.init == "zeros":
            return Recipe("init", args={"init": "zeros"})
        return Recipe(
            "init",
            args={"init": "normal", "std": router.init_std, "seed": derive_seed(self.seed, *key)},
        )

    def moa(self, i: int, mix: AttentionMixture) -> None:
        """BAM: attention expert j is source j's q, k, v, o; k and v merged when shared."""
        d, n = self.r.arch.hidden_size, len(mix.experts)
        active = getattr(mix.router, "k", n) / n  # a router without k runs every expert
        self.add(MOA_ROUTER.format(i=i), (n, d),
                 self.router_recipe(mix.router, "attention-router", i), "router", i)
        for role in ATTENTION_ROLES:
            if not self.r.arch.has_role(role):
                continue
            if mix.share_kv and role[0] in "kv":
                self.add_merged(role, "attention", i)
                continue
            tensor = self.family.tensor(role, i)
            parts = tuple(Recipe("copy", (TensorRef(src, tensor),)) for src in mix.experts)
            self.add(MOA_EXPERTS[role].format(i=i), (n, *self.source_shape(tensor)),
                     Recipe("stack", parts=parts), "attention", i, active)

    def expert_recipe(self, mix: FFNMixture, i: int, j: int, proj: str) -> Recipe:
        expert = mix.experts[j]
        ref = TensorRef(expert.source, self.family.tensor(FFN_ROLE[proj], i))
        if expert.drop == 0.0:
            return Recipe("copy", (ref,))
        return Recipe(
            "drop",
            (ref,),
            {
                "rate": expert.drop,
                "dim": 1 if proj == "down" else 0,
                "neuron_seed": derive_seed(self.seed, "drop", i, j),
                "value_seed": derive_seed(self.seed, "drop-values", i, j, proj),
            },
        )

    def shards(self, recipe: Recipe, proj: str, g: int) -> list[Recipe]:
        """The ``g`` fine-grained experts cut from one expert's ``proj`` (He et al. 2024):
        rows of gate and up, columns of down. Each down shard is scaled by ``g``: the router
        gives each shard p/g, and the scale folded into the weights makes the layer equal
        the coarse MoE at build time while the model stays a standard top-k MoE."""
        if g == 1:
            return [recipe]
        dim = 1 if proj == "down" else 0
        f = self.r.arch.intermediate_size
        w = f // g
        scale = {"scale": float(g)} if proj == "down" else {}
        return [Recipe("slice", parts=(recipe,), args={"dim": dim, "start": s * w,
                                                       "end": (s + 1) * w, **scale})
                for s in range(g)]

    def domain_recipe(self, name: str) -> Recipe:
        """A domain's embedding; how it is made is recorded once, in ``Plan.domains``."""
        return Recipe("domain", args={"name": name})

    def nexus_projection(self, i: int, m: int) -> list[tuple[str, tuple[int, int], Recipe]]:
        """(name, shape, init recipe) of W1 [2d, m] and W2 [d, d] of layer ``i``."""
        d = self.r.arch.hidden_size
        return [
            (name.format(i=i), shape, Recipe("init", args={
                "init": "normal", "std": std, "seed": derive_seed(self.seed, "nexus", tag, i)}))
            for tag, name, shape, std in (("w1", NEXUS_W1, (2 * d, m), m**-0.5),
                                          ("w2", NEXUS_W2, (d, d), 1 / d))
        ]

    def nexus_gate(self, i: int, mix: FFNMixture) -> Recipe:
        """The expert embeddings ``e = W2 . SwiGLU(W1 . dom)`` [n, d] as a linear gate."""
        m = self.r.domains[mix.experts[0].source].width
        (_, _, w1), (_, _, w2) = self.nexus_projection(i, m)
        parts = tuple(self.domain_recipe(e.source) for e in mix.experts)
        return Recipe("nexus_gate", args={"w1": w1.args, "w2": w2.args}, parts=parts)

    def nexus_router(self, i: int, mix: FFNMixture) -> None:
        """Domain embeddings [n, m] (frozen) and the projection W1 [2d, m], W2 [d, d].

        W1 has std 1/sqrt(m) (z of unit scale for unit-RMS domain embeddings) and W2 std
        1/d (router logits of order 1 for unit-RMS tokens, whatever d), seeded per layer
        (not per expert count), so a model extended by one expert keeps the projection it
        would have been built with.
        """
        n = len(mix.experts)
        m = self.r.domains[mix.experts[0].source].width
        parts = tuple(self.domain_recipe(e.source) for e in mix.experts)
        self.add(NEXUS_DOMAINS.format(i=i), (n, m), Recipe("stack", parts=parts), "domains", i)
        for name, shape, recipe in self.nexus_projection(i, m):
            self.add(name, shape, recipe, "router", i, active=0.0)  # once per forward

    def prompt_rows(self, i: int, mix: FFNMixture, init: PromptInit) -> Recipe:
        """Router rows from the hidden states at layer ``i``'s input (docs/spec.md)."""
        parts = tuple(
            Recipe("prompt_state", args={
                "expert": e.source,
                "source": mix.prompt_source,
                "layer": i,
                "prompts": list(init.prompts[e.source]),
                "negative": list((init.negative or {}).get(e.source, [])),
                "max_tokens": init.max_tokens,
            })
            for e in mix.experts
        )
        return Recipe("stack", parts=parts)

    def moe(self, i: int, mix: FFNMixture) -> None:
        d = self.r.arch.hidden_size
        n = len(mix.experts)
        g = granularity(self.r, mix)
        router = mix.router
        if isinstance(router, NexusRouter) and self.format.name == "native":
            self.nexus_router(i, mix)
        elif isinstance(router, NexusRouter):  # a Hugging Face gate: the projection baked in
            self.add(self.layout.router.format(i=i), (n, d), self.nexus_gate(i, mix), "router", i)
        else:
            recipe = (self.prompt_rows(i, mix, router.init)
                      if isinstance(router.init, PromptInit)
                      else self.router_recipe(router, "router", i))
            if g > 1 and recipe.args.get("init") != "zeros":  # each expert's row g times
                # (a zero row repeated is the same zeros)
                recipe = Recipe(recipe.op, recipe.inputs, {**recipe.args, "repeat": g},
                                recipe.parts)
            self.add(self.layout.router.format(i=i), (n * g, d), recipe, "router", i)
        if isinstance(mix.router, TokenMixingRouter):
            # Each expert processes one mixed token per group of G tokens.
            active = min(1.0, n / mix.router.group_size)
            describe = f"token mixing G={mix.router.group_size} T={mix.router.temperature:g}"
            if mix.router.learn_temperature:
                self.add(TEMPERATURE.format(i=i), (),
                         Recipe("init", args={"init": "constant", "value": mix.router.temperature}),
                         "router", i)
        else:
            active = mix.router.k / n
            k = mix.router.k
            fine = f" x G={g} (k={k * g} of {n * g})" if g > 1 else ""
            describe = f"{mix.router.kind} k={k}{fine}" + (
                "" if mix.router.normalize else " unnormalised")
        if mix.kind is None or mix.kind.own_ffn:
            self.ffn_experts(i, mix, active)
        else:
            self.shared_ffn(i, mix)
        self.new_tensors(i, mix, active)
        experts = _compact([e.source for e in mix.experts])
        if g > 1:
            width = self.r.arch.intermediate_size // g
            # down x G: each shard is routed p/G, so the layer equals the coarse MoE
            experts += f" in {g} shards ({n * g} experts of width {width}, down x{g})"
        self.rows.append({
            "layer": i,
            "ffn": "moe",
            "experts": (mix.kind and mix.kind.summary()) or experts,
            "drop": max(e.drop for e in mix.experts),
            "router": describe,
            "shared": mix.shared,
            "rule": mix.rule,
        })

    def ffn_experts(self, i: int, mix: FFNMixture, active: float) -> None:
        """The experts' SwiGLU FFNs; with granularity G, G shards of each, in expert order
        (expert j's shards are experts j*G .. j*G+G-1, matching the repeated router rows)."""
        n, g = len(mix.experts), granularity(self.r, mix)
        for proj in PROJECTIONS:
            full = self.source_shape(self.family.tensor(FFN_ROLE[proj], i))
            dim = 1 if proj == "down" else 0
            shape = (*full[:dim], full[dim] // g, *full[dim + 1:])
            recipes = [shard for j in range(n)
                       for shard in self.shards(self.expert_recipe(mix, i, j, proj), proj, g)]
            n_fine = len(recipes)
            if self.layout.stacked:
                name = self.layout.expert[proj].format(i=i)
                self.add(name, (n_fine, *shape), Recipe("stack", parts=tuple(recipes)), "experts",
                         i, active)
            else:
                for j, recipe in enumerate(recipes):
                    self.add(self.layout.expert[proj].format(i=i, j=j), shape, recipe, "experts", i, active)
        if mix.shared is not None:
            d = self.r.arch.hidden_size
            gated = self.format.gates_shared_expert
            for proj in PROJECTIONS:
                tensor = self.family.tensor(FFN_ROLE[proj], i)
                # A gated shared expert (Qwen2-MoE) starts at sigmoid(0) = 1/2: doubling its
                # down-projection keeps the built model exactly function-preserving.
                args = {"scale": 2.0} if gated and proj == "down" else {}
                self.add(self.layout.shared[proj].format(i=i), self.source_shape(tensor),
                         Recipe("copy", (TensorRef(mix.shared, tensor),), args), "shared", i)
            if gated:
                assert self.layout.shared_expert_gate is not None
                self.add(self.layout.shared_expert_gate.format(i=i), (1, d),
                         Recipe("init", args={"init": "zeros"}), "shared", i)

    def shared_ffn(self, i: int, mix: FFNMixture) -> None:
        """Experts without an FFN of their own (PESC's adapters): the source's FFN copied
        once, shared, under its dense names."""
        source = mix.experts[0].source  # every expert names the shared FFN's source
        for proj in PROJECTIONS:
            tensor = self.family.tensor(FFN_ROLE[proj], i)
            self.add(tensor, self.source_shape(tensor),
                     Recipe("copy", (TensorRef(source, tensor),)), "ffn", i)

    def new_tensors(self, i: int, mix: FFNMixture, active: float) -> None:
        """The tensors the layer's FFN config adds beyond its experts' FFNs, initialised
        as it declares (`new_tensors`: PESC's adapters)."""
        config = self.ffn_config(mix)
        assert isinstance(config, RoutedFFNConfig)
        for new in config.new_tensors(self.r.arch.hidden_size):
            args = new.init if new.seed is None else {
                **new.init, "seed": derive_seed(self.seed, new.seed, i)}
            self.add(new.name.format(i=i), new.shape, Recipe("init", args=args), new.group, i,
                     active)

    # -- config and totals
    def native_config(self) -> ModelConfig:
        layers = [LayerConfig(attention=self.attention_config(layer.attention),
                              ffn=self.ffn_config(layer.ffn)) for layer in self.r.layers]
        trainable = None
        if self.r.train is not None:  # the model's own (native) names, whatever the format
            stored = [t.name for t in self.tensors if t.trainable]
            trainable = native_names(self.layout, layers, stored)
        first = next(iter(self.r.sources.values()))
        return model_config(self.r.arch, self.family.name, layers, block=self.r.block,
                            dtype=self.dtype, trainable=trainable,
                            where=f"source '{first.name}' ({first.path})")

    def attention_config(self, attn: AttentionMixture | None) -> AttentionConfig:
        if attn is None:
            return DenseAttentionConfig()
        router = router_config(attn.router.kind, attn.router.model_dump())
        return MoAAttentionConfig(num_experts=len(attn.experts),
                                  share=("k", "v") if attn.share_kv else (), router=router)

    def ffn_config(self, mix: FFNMixture | None) -> FFNConfig:
        if mix is None:
            return DenseFFNConfig()
        width = self.r.arch.intermediate_size
        aux = AuxLossConfig(load_balance=mix.aux_loss.load_balance, z_loss=mix.aux_loss.z_loss)
        shared = None
        if mix.shared is not None:
            shared = SharedExpertConfig(intermediate_size=width,
                                        gate=self.format.gates_shared_expert)
        g = granularity(self.r, mix)  # the shared expert keeps the full width
        values = {**(mix.kind.model_dump() if mix.kind is not None else {}),
                  "num_experts": len(mix.experts) * g, "intermediate_size": width // g,
                  "router": self.router_config(mix), "shared_expert": shared, "aux_loss": aux}
        return ffn_config(_ffn_kind(mix), values)

    def router_config(self, mix: FFNMixture) -> MoERouterConfig:
        router = mix.router
        if isinstance(router, NexusRouter) and self.format.name == "native":
            width = self.r.domains[mix.experts[0].source].width
            return NexusRouterConfig(k=router.k, normalize=router.normalize, domain_dim=width)
        values = router.model_dump()
        if isinstance(router, NexusRouter):  # outside the native format: a linear top-k gate
            values["kind"] = "topk"
        if "k" in values:  # fine-grained experts are routed k x G
            values["k"] *= granularity(self.r, mix)
        return router_config(values["kind"], values)

    def totals(self) -> Totals:
        arch = self.r.arch
        params = sum(t.numel for t in self.tensors)
        active = round(sum(t.numel * t.active for t in self.tensors))
        trainable = sum(t.numel for t in self.tensors if t.trainable)
        matmul = sum(
            t.numel * t.active for t in self.tensors
            if len(t.shape) >= 2 and t.group != "embeddings"
        )
        # Nexus expert embeddings [n, d] act as a router weight for every token.
        if self.format.name == "native":  # (a baked gate is a planned tensor already)
            matmul += sum(
                len(layer.ffn.experts) * arch.hidden_size for layer in self.r.layers
                if layer.ffn is not None and isinstance(layer.ffn.router, NexusRouter)
            )
        head = arch.vocab_size * arch.hidden_size  # lm_head (tied or not); the lookup is free
        ctx = min(FLOPS_CONTEXT, arch.max_position_embeddings)
        kv_row = 2 * arch.num_key_value_heads * arch.head_dim * nbytes(self.dtype)
        scores, kv_cache = 0.0, 0
        for layer in self.r.layers:
            attn = layer.attention
            computed = 1 if attn is None else len(attn.experts)  # every expert runs
            caches = 1 if attn is None or attn.share_kv else len(attn.experts)
            scores += 4 * computed * arch.num_attention_heads * arch.head_dim * (ctx + 1) / 2
            kv_cache += caches * kv_row
        flops = round(2 * (matmul + head) + scores)
        size = sum(t.numel * nbytes(t.dtype) for t in self.tensors)
        return Totals(params, active, trainable, flops, ctx, size, kv_cache)


def _ffn_kind(mix: FFNMixture) -> str:
    """The `kind` of the FFN config the layer's experts make."""
    return ExpertsNode.ffn if mix.kind is None else mix.kind.ffn


def _expert_kind(mix: FFNMixture) -> str:
    """What a Hugging Face format must express: the FFN's kind, or for FFN experts the
    router's."""
    kind = _ffn_kind(mix)
    return mix.router.kind if kind == ExpertsNode.ffn else kind


def _attention_row(attn: AttentionMixture | None) -> str:
    if attn is None:
        return "dense"
    k = getattr(attn.router, "k", None)
    router = attn.router.kind + ("" if k is None else f" k={k}")
    kv = ", shared kv" if attn.share_kv else ""
    return f"MoA {_compact(list(attn.experts))} ({router}{kv})"


def _compact(names: list[str]) -> str:
    if len(set(names)) == 1 and len(names) > 1:
        return f"{len(names)} x {names[0]}"
    return ", ".join(names)


def _check_train_groups(resolved: Resolved, tensors: list[PlannedTensor]) -> None:
    """Every group named in ``train`` must select at least one tensor."""
    present = {t.group for t in tensors}
    for j, name in enumerate(resolved.spec.train or []):
        if name != "all" and name not in present:
            raise SpecError(
                f"train group '{name}' matches no tensor of this model",
                location=resolved.spec.origin.locate(("train", j)),
                hint=f"groups in this model: {', '.join(sorted(present))}",
            )


MAX_GROWTH = 256  # output bytes per byte of the largest source: 64 experts of it is ~40x


def _check_size(resolved: Resolved, tensors: list[PlannedTensor]) -> None:
    """Refuse a plan far larger than its sources (a typo such as ``bottleneck: 1e12``)
    before anything tries to allocate or write it."""
    largest = max(resolved.sources.values(), key=lambda c: sum(
        e.end - e.start for e in c.tensors.values()))
    source_bytes = max(1, sum(e.end - e.start for e in largest.tensors.values()))
    out_bytes = sum(t.numel * nbytes(t.dtype) for t in tensors)
    if out_bytes <= MAX_GROWTH * source_bytes:
        return
    biggest = max(tensors, key=lambda t: t.numel)
    raise SpecError(
        f"the plan writes {_bytes(out_bytes)}, {out_bytes / source_bytes:,.0f}x the largest "
        f"source '{largest.name}' ({_bytes(source_bytes)}); plans over {MAX_GROWTH}x are "
        f"refused as a likely mistake (largest tensor: {biggest.name}, shape "
        f"{list(biggest.shape)})",
        location=resolved.spec.origin.locate(()),
        hint="check the sizes in the spec (expert count, adapter bottleneck)",
    )


def _bytes(n: int) -> str:
    for unit, size in (("PB", 1 << 50), ("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,} bytes"


def normalised_spec(resolved: Resolved) -> dict[str, Any]:
    """The spec as built: defaults written out, resolved choices (name, dtype) filled in."""
    data = resolved.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["name"] = resolved.name
    data["sources"] = {name: str(ckpt.path) for name, ckpt in resolved.sources.items()}
    for domain in (data.get("domains") or {}).values():
        for key in ("texts", "embedding"):
            if key in domain:
                domain[key] = str(spec_path(resolved.spec, domain[key], pattern=key == "texts"))
    data["block"] = resolved.spec.block or "sequential"
    data["train"] = data.get("train") or ["all"]
    data["output"]["dtype"] = resolved.dtype
    order = [field.alias or name for name, field in type(resolved.spec).model_fields.items()]
    return {key: data[key] for key in order if key in data}


def _check_granularity(resolved: Resolved) -> None:
    """Fine-grained experts split the sources' FFN width into equal shards."""
    f = resolved.arch.intermediate_size
    for r, rule in enumerate(resolved.spec.layers):
        g = rule.ffn.granularity if rule.ffn is not None else 1
        if f % g:
            first = next(iter(resolved.sources.values()))
            divisors = [x for x in range(2, min(f, 1024) + 1) if f % x == 0][:8]
            raise SpecError(
                f"granularity {g} does not divide the FFN width of the sources "
                f"(intermediate_size {f} in source '{first.name}'), so the experts cannot be "
                f"cut into {g} equal shards",
                location=resolved.spec.origin.locate(("layers", r, "ffn", "granularity")),
                hint=(f"use a divisor of {f}: {', '.join(map(str, divisors))}" if divisors
                      else "remove 'granularity'"),
            )


def _granular_zeros_warnings(resolved: Resolved) -> list[str]:
    """Zero router rows tie every shard, so top-(k x G) may keep parts of many experts."""
    layers = tuple(
        layer.index for layer in resolved.layers
        if (mix := layer.ffn) is not None and granularity(resolved, mix) > 1
        and getattr(mix.router, "init", None) == "zeros"
    )
    if not layers:
        return []
    return [f"layers {ranges(layers)}: granularity with router init: zeros ties every "
            "expert's shards, so top-(k x G) may keep shards of different experts and the "
            "layer need not equal the coarse MoE at build time; use init: random (or "
            "prompts) for an exact start"]


def plan(resolved: Resolved) -> Plan:
    """The upcycling plan: every output tensor's recipe, the output config, and totals."""
    _check_granularity(resolved)
    shape = moe_shape(resolved)
    fmt, why = choose_format(resolved, shape)
    planner = _Planner(resolved, fmt)
    planner.run()
    _check_train_groups(resolved, planner.tensors)
    _check_size(resolved, planner.tensors)
    config = planner.format.write_config(planner.native_config(), resolved.arch.initializer_range)
    first = next(iter(resolved.sources.values()))
    warnings = list(resolved.warnings) + _granular_zeros_warnings(resolved)
    if fmt != "native" and "nexus" in shape.unexpressible:
        warnings.append(
            f"format {fmt}: each nexus router is baked into a linear gate (its expert "
            "embeddings at build time); the projection and domain embeddings are not stored, "
            "so the model cannot be extended or trained the Nexus way"
        )
    return Plan(
        name=resolved.name,
        format=fmt,
        format_reason=why,
        dtype=resolved.dtype,
        config=config,
        tensors=tuple(planner.tensors),
        sources={
            name: {"path": str(ckpt.path), "fingerprint": ckpt.fingerprint}
            for name, ckpt in resolved.sources.items()
        },
        tokenizer_source=first.name if first.tokenizer else None,
        spec=normalised_spec(resolved),
        totals=planner.totals(),
        layers=tuple(planner.rows),
        warnings=tuple(warnings),
        domains={name: _provenance(domain) for name, domain in resolved.domains.items()},
    )


def _provenance(domain: ResolvedDomain) -> dict[str, Any]:
    """Where a domain embedding comes from, as recorded in the plan."""
    if domain.kind == "texts":
        return {
            "kind": "texts",
            "embed_with": domain.embed_with,
            "documents": [str(f) for f in domain.files],
            "matched": domain.matched,
            "max_tokens": domain.max_tokens,
            "fingerprint": domain.fingerprint,
            "width": domain.width,
        }
    return {"kind": "embedding", "path": str(domain.files[0]), "key": domain.key,
            "fingerprint": domain.fingerprint, "width": domain.width}
