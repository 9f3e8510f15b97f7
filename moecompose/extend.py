"""``moecompose extend``: add one expert to a built MoE without retraining its router from
scratch (the point of Nexus, Gritsch et al. 2024).

The extension is planned like a build. The artifact's spec plus the new expert is resolved
and planned, which checks the new source against the others and gives the new model's
shapes and its recorded spec. Then every recipe is rewritten to start from the artifact
(the input named ``@base``), whose weights may have been trained since it was built:

* routed experts, domain embeddings and router rows: the artifact's, plus one row for
  the new expert (its FFN, its domain embedding, or a router row from its prompts or
  documents, scaled to the mean norm of the existing rows);
* non-expert tensors: ``(1 - lam) * current + lam * new``, by default ``lam = 1/(m+1)``
  when ``m`` sources are merged, so a uniform average stays a uniform average;
* everything else (the Nexus projection, shared experts, attention experts, norms of
  dense layers that do not merge the new source): carried over unchanged.

With the same ``lam``, ``extend(build(spec), X)`` equals ``build(spec + X)`` tensor for
tensor whenever the router parameters are the seeded ones (the Nexus projection is
seeded per layer, not per expert count). The artifact is only read.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from moecompose.artifact import DOMAINS_FILE, BuildResult, Progress, read_plan
from moecompose.errors import BuildError, MoeComposeError, SpecError
from moecompose.plan.planner import plan as make_plan
from moecompose.plan.recipe import Plan, PlannedTensor, Recipe, TensorRef
from moecompose.resolve import resolve
from moecompose.sources.checkpoint import open_tensors, tensors_fingerprint
from moecompose.sources.safetensors_io import TensorEntry
from moecompose.sources.vectors import documents, files_fingerprint
from moecompose.spec.schema import Domain, Experts, ExpertsNode, PromptInit, Spec

BASE = "@base"  # the artifact being extended, as a plan input (no spec name can be this)
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
MERGE_OPS = ("copy", "mean", "weighted")


@dataclass(frozen=True)
class NewExpert:
    """The expert to add: a dense model branched from the same seed, and what routes to it.

    Nexus layers need the new domain (``domain_texts`` or ``domain_embedding``); top-k
    layers need ``prompts`` or ``domain_texts`` for the new router row.
    """

    name: str
    path: Path
    domain_texts: str | None = None
    domain_embedding: Path | None = None
    domain_key: str | None = None
    prompts: tuple[str, ...] = ()


def extend(
    artifact: str | Path,
    out: str | Path,
    expert: NewExpert,
    *,
    lam: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Write ``artifact`` plus ``expert`` to ``out`` (see the module docstring)."""
    from moecompose.build.executor import build  # computes weights: torch

    return build(extend_plan(artifact, expert, lam=lam), out, force=force, progress=progress)


def extend_plan(artifact: str | Path, expert: NewExpert, *, lam: float | None = None) -> Plan:
    """The plan of ``artifact`` extended by ``expert``; builds like any plan."""
    artifact = Path(artifact).resolve()
    base = read_plan(artifact)
    spec_data = copy.deepcopy(base.spec)
    _check_expert(expert, spec_data, artifact)
    weights = _merge_weights(spec_data)
    lam = 1.0 / (len(weights) + 1) if lam is None else lam
    if not 0.0 <= lam <= 1.0:
        raise BuildError(f"--lam {lam:g} is outside [0, 1]",
                         hint="lam is the new expert's share of the merged tensors")
    kinds = _add_expert(spec_data, expert)
    if "nexus" in kinds and base.format != "native":
        raise SpecError(
            f"{artifact} is a {base.format} export: its nexus routers were baked into linear "
            "gates, without the projection and domain embeddings extend keeps",
            hint="extend a native build of the spec (output: {format: native})",
        )
    spec_data["sources"][expert.name] = str(expert.path.resolve())
    merged = {n: (1 - lam) * w for n, w in weights.items()} | {expert.name: lam}
    uniform = all(math.isclose(w, lam) for w in merged.values())
    spec_data["merge"] = (
        "average" if uniform and set(merged) == set(spec_data["sources"]) else {"weights": merged}
    )
    new_domain = _new_domain(expert, kinds)
    if new_domain is not None:
        spec_data.setdefault("domains", {})[expert.name] = new_domain
    recorded = copy.deepcopy(spec_data)
    # Plan with the artifact's saved domain vectors: the old texts may be gone by now.
    for name in base.domains:
        spec_data["domains"][name] = {"embedding": str(artifact / DOMAINS_FILE), "key": name}
    spec_data["output"]["format"] = base.format
    try:
        spec = Spec.model_validate(spec_data)
        new = make_plan(resolve(spec))
    except MoeComposeError as exc:
        raise type(exc)(f"extending {artifact} by '{expert.name}': {exc.message}",
                        hint=exc.hint) from None
    index = open_tensors("the artifact", artifact)
    rewrite = _Rewrite(base, new, index, expert, lam)
    tensors = tuple(rewrite.tensor(t) for t in new.tensors)
    derivation = {
        "operation": "extend",
        "from": str(artifact),
        "from_plan_digest": base.digest(),
        "expert": expert.name,
        "source": str(expert.path.resolve()),
        "lambda": lam,
        "router": rewrite.router_note(kinds),
    }
    return replace(
        new,
        name=f"{base.name}+{expert.name}",
        tensors=tensors,
        sources={**new.sources, BASE: {"path": str(artifact), "kind": "artifact",
                                       "fingerprint": tensors_fingerprint(index)}},
        spec={**new.spec, "name": f"{base.name}+{expert.name}", "merge": recorded["merge"],
              "output": recorded["output"],
              **({"domains": recorded["domains"]} if "domains" in recorded else {})},
        # Existing domains are read back from the artifact's domains.safetensors; the
        # provenance they were first made with is kept under "from".
        domains={name: {**d, "from": base.domains[name]} if name in base.domains else d
                 for name, d in new.domains.items()},
        derivations=(*base.derivations, derivation),
    )


def _check_expert(expert: NewExpert, spec: dict[str, Any], artifact: Path) -> None:
    if not NAME_PATTERN.match(expert.name):
        raise SpecError(f"expert name {expert.name!r} is not a valid source name",
                        hint="use letters, digits, '_', '.' and '-', starting with a letter")
    if expert.name in spec["sources"]:
        raise SpecError(f"{artifact} already has a source named '{expert.name}'",
                        hint="give the new expert another name")
    if expert.domain_texts is not None and expert.domain_embedding is not None:
        raise SpecError("give --domain-texts or --domain-embedding, not both")
    granular = [i for i, rule in enumerate(spec.get("layers", []))
                if ((rule.get("ffn") or {}).get("granularity") or 1) > 1]
    if granular:
        raise SpecError(
            f"{artifact} splits its experts into shards (granularity > 1 in layer rule "
            f"{granular[0]}): extend cannot add an expert to it yet",
            hint="extend the coarse model (granularity 1), then build the granular one")


def _merge_weights(spec: dict[str, Any]) -> dict[str, float]:
    merge = spec.get("merge", "average")
    if merge == "average":
        return {name: 1.0 / len(spec["sources"]) for name in spec["sources"]}
    if "from" in merge:
        return {merge["from"]: 1.0}
    total = sum(merge["weights"].values())
    return {n: w / total for n, w in merge["weights"].items() if w > 0}


def _add_expert(spec: dict[str, Any], expert: NewExpert) -> set[str]:
    """Append the expert to every MoE rule; returns the router kinds extended."""
    kinds: set[str] = set()
    for r, rule in enumerate(spec.get("layers", [])):
        ffn = rule.get("ffn")
        if ffn is None:
            continue
        router = ffn.get("router", {})
        kind = router.get("kind")
        if not isinstance(ffn["experts"], list) or kind not in ("nexus", "topk"):
            raise SpecError(
                f"layer rule {r} has {_describe(ffn)}; extend adds an FFN expert to layers "
                "whose experts are a list of sources routed by nexus or topk",
                hint="rebuild from a spec that lists the new source instead",
            )
        ffn["experts"].append(expert.name)
        kinds.add(kind)
        init = router.get("init")
        if kind == "topk" and isinstance(init, dict):
            if not expert.prompts:
                raise SpecError(
                    f"layer rule {r}'s router rows come from prompts",
                    hint="give the new expert's prompts with --prompt",
                )
            init["prompts"][expert.name] = list(expert.prompts)
    if not kinds:
        raise SpecError("the artifact has no MoE layer to extend")
    if "topk" in kinds and not expert.prompts and expert.domain_texts is None:
        raise SpecError(
            "a top-k router needs a row for the new expert",
            hint="give --prompt TEXT (repeatable) or --domain-texts GLOB",
        )
    if "nexus" in kinds and expert.domain_texts is None and expert.domain_embedding is None:
        raise SpecError(
            "the nexus router needs the new expert's domain",
            hint="give --domain-texts GLOB or --domain-embedding FILE",
        )
    return kinds


def _describe(ffn: dict[str, Any]) -> str:
    experts = ffn["experts"]
    if isinstance(experts, dict):  # a built artifact's spec: valid
        node = TypeAdapter(Experts).validate_python(experts)
        assert isinstance(node, ExpertsNode)
        return node.title
    return f"a {ffn.get('router', {}).get('kind')} router"


def _new_domain(expert: NewExpert, kinds: set[str]) -> dict[str, Any] | None:
    if "nexus" not in kinds:
        return None
    if expert.domain_texts is not None:
        return {"texts": str(Path(expert.domain_texts).expanduser().absolute())}
    assert expert.domain_embedding is not None
    domain: dict[str, Any] = {"embedding": str(expert.domain_embedding.resolve())}
    if expert.domain_key is not None:
        domain["key"] = expert.domain_key
    return domain


class _Rewrite:
    """Turn the new model's recipes into recipes that start from the artifact."""

    def __init__(self, base: Plan, new: Plan, index: dict[str, TensorEntry], expert: NewExpert,
                 lam: float) -> None:
        self.base, self.new, self.index, self.expert, self.lam = base, new, index, expert, lam
        self.row_from = "prompts" if expert.prompts else "documents"

    def tensor(self, t: PlannedTensor) -> PlannedTensor:
        entry = self.index.get(t.name)
        if entry is None:
            if not _reads_only(t.recipe, self.expert.name):
                raise BuildError(f"the artifact lacks tensor '{t.name}'",
                                 hint="is it a moecompose artifact of this spec?")
            return t  # a new per-expert tensor (Hugging Face layouts): the new source's
        if entry.shape == t.shape:
            return replace(t, recipe=self.same_shape(t))
        if entry.shape[1:] == t.shape[1:] and entry.shape[0] + 1 == t.shape[0]:
            rows = tuple(Recipe("copy", (TensorRef(BASE, t.name),), {"index": j})
                         for j in range(entry.shape[0]))
            return replace(t, recipe=Recipe("stack", parts=(*rows, self.new_row(t))))
        raise BuildError(
            f"tensor '{t.name}' has shape {list(entry.shape)} in the artifact; the extended "
            f"model needs {list(t.shape)}",
            hint="was the artifact built from a different spec?",
        )

    def same_shape(self, t: PlannedTensor) -> Recipe:
        current = TensorRef(BASE, t.name)
        new = [r for r in t.recipe.inputs if r.source == self.expert.name]
        if t.recipe.op in MERGE_OPS and new and self.lam > 0:
            return Recipe("weighted", (current, new[0]), {"weights": [1 - self.lam, self.lam]})
        return Recipe("copy", (current,))

    def new_row(self, t: PlannedTensor) -> Recipe:
        """The new expert's row of a stacked tensor: its FFN, its domain, or a router row."""
        if t.group != "router":
            assert t.recipe.op == "stack"
            return t.recipe.parts[-1]
        # Prompt-initialised rows say which model and truncation the router's rows use.
        prompted = next((p.args for p in t.recipe.parts if p.op == "prompt_state"), {})
        args: dict[str, Any] = {
            "expert": self.expert.name,
            "source": prompted.get("source") or self._prompt_source(),
            "layer": t.layer,
            "max_tokens": prompted.get("max_tokens", PromptInit.model_fields["max_tokens"].default),
            "norm_like": f"{BASE}:{t.name}",
        }
        if self.expert.prompts:
            args["prompts"] = list(self.expert.prompts)
        else:
            assert self.expert.domain_texts is not None
            files = documents(Path(self.expert.domain_texts).expanduser().absolute())
            if not files:
                raise SpecError(f"--domain-texts {self.expert.domain_texts!r} matches no file",
                                hint="check the glob (use ** to recurse)")
            files = files[: Domain.model_fields["max_docs"].default]
            args["documents"] = [str(f) for f in files]
            args["fingerprint"] = files_fingerprint(files)
        return Recipe("prompt_state", args=args)

    def _prompt_source(self) -> str:
        spec = self.new.spec
        return spec.get("embed_with") or next(iter(spec["sources"]))

    def router_note(self, kinds: set[str]) -> str:
        notes = []
        if "nexus" in kinds:
            notes.append("nexus: projection and existing domain embeddings carried over; the "
                         "new domain embedding appended")
        if "topk" in kinds:
            notes.append(f"topk: existing rows carried over; the new row from its "
                         f"{self.row_from}, scaled to the existing rows' mean norm")
        return "; ".join(notes)


def _reads_only(recipe: Recipe, source: str) -> bool:
    refs = [*recipe.inputs, *(r for p in recipe.parts for r in p.inputs)]
    return bool(refs) and all(r.source == source for r in refs)
