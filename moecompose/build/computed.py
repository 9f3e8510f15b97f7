"""Tensors a plan makes by running a model rather than by arithmetic on weights: domain
embeddings of texts (Nexus) and router rows from prompts.

A source's metadata and tokenizer are read once per build; each set of texts (a domain's
documents, an expert's prompts) then streams the model's layers once, and only when its
result is not in the on-disk cache (keyed by the source's weights, the texts' contents
and the settings), so a rebuild does not run the model again unless something it depends
on changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moecompose.build.recipes import Lookup
from moecompose.errors import BuildError
from moecompose.plan.recipe import Plan, Recipe, TensorRef
from moecompose.sources.vectors import VectorFileError, files_fingerprint

if TYPE_CHECKING:  # a plan with nothing to compute does not import torch or the model
    import numpy as np
    import torch

    from moecompose.build.embed import Embedder, EmbeddingCache


def recipe_key(recipe: Recipe) -> str:
    return json.dumps({"op": recipe.op, **recipe.args}, sort_keys=True)


@dataclass
class Computed:
    """domain name -> [m]; prompt_state recipe key -> [d]; warnings for the user."""

    domains: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def tensor(self, recipe: Recipe) -> torch.Tensor:
        if recipe.op == "domain":
            return self.domains[recipe.args["name"]]
        return self.prompt_rows[recipe_key(recipe)]

    def value(self, recipe: Recipe) -> np.ndarray:
        """The value of a `domain` or `prompt_state` recipe, as the build computes: fp32."""
        return self.tensor(recipe).float().numpy()


class _Models:
    """Source models (metadata and tokenizer), opened on first use."""

    def __init__(self, plan: Plan) -> None:
        self.paths = {name: Path(src["path"]) for name, src in plan.sources.items()}
        self.loaded: dict[str, Embedder] = {}
        self.fingerprints: dict[str, str] = {}

    def fingerprint(self, name: str) -> str:
        from moecompose.build.embed import weights_fingerprint

        if name not in self.fingerprints:
            self.fingerprints[name] = weights_fingerprint(self.paths[name])
        return self.fingerprints[name]

    def __getitem__(self, name: str) -> Embedder:
        from moecompose.build.embed import Embedder

        if name not in self.loaded:
            self.loaded[name] = Embedder.load(name, self.paths[name])
        return self.loaded[name]


def compute(plan: Plan, lookup: Lookup) -> Computed:
    """Every domain embedding and prompt row ``plan`` needs; ``lookup`` finds the input
    tensors a prompt row's norm is matched to."""
    out = Computed()
    prompt_parts = [
        part for tensor in plan.tensors for part in tensor.recipe.parts
        if part.op == "prompt_state"
    ]
    if not plan.domains and not prompt_parts:
        return out
    from moecompose.build.embed import EmbeddingCache, nearly_parallel_rows

    cache = EmbeddingCache()
    models = _Models(plan)
    for name, provenance in plan.domains.items():
        out.domains[name] = _domain(name, provenance, models, cache)
    _prompt_rows(prompt_parts, models, cache, lookup, out)
    for experts, rows in _rows_by_experts(plan, out).items():
        out.warnings.extend(nearly_parallel_rows(rows, list(experts)))
    return out


def _check_unchanged(name: str, files: list[Path], fingerprint: str) -> None:
    try:
        now = files_fingerprint(files)
    except VectorFileError as exc:
        raise BuildError(f"domain '{name}': {exc}", hint="plan the spec again") from None
    if now != fingerprint:
        raise BuildError(
            f"domain '{name}': its files changed since the plan was made",
            hint="plan (or build) the spec again",
        )


def _domain(name: str, provenance: dict[str, Any], models: _Models, cache: EmbeddingCache
            ) -> torch.Tensor:
    from moecompose.build.embed import read_embedding_file

    if provenance["kind"] == "embedding":
        path = Path(provenance["path"])
        _check_unchanged(name, [path], provenance["fingerprint"])
        return read_embedding_file(path, provenance.get("key"))
    files = [Path(f) for f in provenance["documents"]]
    _check_unchanged(name, files, provenance["fingerprint"])
    source = provenance["embed_with"]
    key = cache.key(kind="domain_texts", weights=models.fingerprint(source),
                    texts=provenance["fingerprint"], max_tokens=provenance["max_tokens"])
    return cache.get_or_compute(
        key, lambda: models[source].file_embedding(files, provenance["max_tokens"])
    )


def _prompt_rows(parts: list[Recipe], models: _Models, cache: EmbeddingCache,
                 lookup: Lookup, out: Computed) -> None:
    """One router row per part: layers that share a source and prompts run in one pass."""
    import torch

    from moecompose.build.embed import prompt_router_rows, read_texts
    from moecompose.sources.safetensors_io import read_tensor

    groups: dict[str, tuple[dict[str, Any], list[Recipe]]] = {}
    for part in parts:
        a = part.args
        what = {k: a.get(k) for k in ("expert", "source", "prompts", "documents", "fingerprint",
                                      "negative", "max_tokens")}
        groups.setdefault(json.dumps(what, sort_keys=True), (what, []))[1].append(part)
    for what, group in groups.values():
        expert, source = what["expert"], what["source"]
        keys = {
            part.args["layer"]: cache.key(kind="router_row", weights=models.fingerprint(source),
                                          layer=part.args["layer"], **what)
            for part in group
        }
        rows = {layer: cache.get(key) for layer, key in keys.items()}
        missing = sorted(layer for layer, row in rows.items() if row is None)
        if missing:
            if what["documents"] is not None:  # a row from a domain's documents
                files = [Path(f) for f in what["documents"]]
                _check_unchanged(expert, files, what["fingerprint"])
                prompts = read_texts(files)
            else:
                prompts = what["prompts"]
            negative = {expert: what["negative"]} if what["negative"] else None
            fresh = prompt_router_rows(models[source], {expert: prompts}, negative, missing,
                                       what["max_tokens"])
            for layer in missing:
                rows[layer] = fresh[layer][0]
                cache.put(keys[layer], fresh[layer][0])
        for part in group:
            row = rows[part.args["layer"]]
            assert row is not None
            if "norm_like" in part.args:  # a row added to trained rows: match their mean norm
                source_name, tensor = part.args["norm_like"].split(":", 1)
                trained = read_tensor(lookup(TensorRef(source_name, tensor))).to(torch.float32)
                row = row * trained.norm(dim=-1).mean()
            out.prompt_rows[recipe_key(part)] = row


def _rows_by_experts(plan: Plan, out: Computed) -> dict[tuple[str, ...], dict[int, torch.Tensor]]:
    """The prompt rows of each set of experts, by layer."""
    import torch

    by_experts: dict[tuple[str, ...], dict[int, torch.Tensor]] = {}
    for tensor in plan.tensors:
        parts = tensor.recipe.parts
        if parts and all(p.op == "prompt_state" for p in parts) and tensor.layer is not None:
            experts = tuple(p.args["expert"] for p in parts)
            rows = torch.stack([out.tensor(p) for p in parts])
            by_experts.setdefault(experts, {})[tensor.layer] = rows
    return by_experts
