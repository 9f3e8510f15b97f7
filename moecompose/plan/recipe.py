"""The plan's data: one recipe per output tensor, and totals. Plain values, no tensors.

Recipe ops (``Recipe.op``):

* ``copy``      one input, optionally times ``scale``; with ``index``, that slice of a
                stacked input
* ``mean``      uniform mean of the inputs (computed in float32)
* ``weighted``  ``sum_i weights[i] * inputs[i]`` (float32)
* ``stack``     ``parts`` (each a recipe) stacked along a new first dimension
* ``init``      ``init: normal`` (``std``, ``seed``), ``uniform`` (``bound``, ``seed``),
                ``constant`` (``value``) or ``zeros``
* ``domain``    [m]: the embedding of domain ``name``, made as ``Plan.domains[name]``
                records (embedded texts or a stored vector)
* ``nexus_gate``    [n, d]: Nexus expert embeddings ``W2 . SwiGLU(W1 . dom)`` from the
                domain ``parts``, W1 and W2 drawn as the ``init`` args ``w1``, ``w2`` say
                (a Nexus router baked into a Hugging Face gate)
* ``prompt_state``  [d]: the mean hidden state at the input of ``layer`` of model ``source``
                over ``prompts``, minus that over ``negative``, L2-normalised
* ``drop``      copy of one input whose neurons ``drop_rows``/``drop_cols`` (chosen by
                ``neuron_seed``, fraction ``rate``) are redrawn from N(mean, std) of the
                replaced values (Drop-Upcycling)
* ``slice``     one part (a recipe reading a tensor: ``copy`` or ``drop``) cut to
                ``start:end`` along ``dim``, optionally times ``scale``: one shard of a
                fine-grained expert (rows of gate/up, columns of down, the latter scaled by
                the granularity)

Any recipe may carry ``repeat: G``: the op makes ``shape[0] / G`` rows, and each row is
written G times in a row (``repeat_interleave``): the router rows of fine-grained experts,
drawn or computed once per coarse expert.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorRef:
    source: str
    tensor: str


@dataclass(frozen=True)
class Recipe:
    op: str
    inputs: tuple[TensorRef, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)
    parts: tuple[Recipe, ...] = ()

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        if self.inputs:
            out["inputs"] = [f"{r.source}:{r.tensor}" for r in self.inputs]
        out.update(self.args)
        if self.parts:
            out["parts"] = [p.to_data() for p in self.parts]
        return out

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        op = data.pop("op")
        inputs = tuple(TensorRef(*s.split(":", 1)) for s in data.pop("inputs", []))
        parts = tuple(cls.from_data(p) for p in data.pop("parts", []))
        return cls(op, inputs, data, parts)

    def refs(self) -> Iterator[TensorRef]:
        """Every tensor this recipe reads, its parts' included (and the rows a prompt row's
        norm is matched to, ``norm_like``)."""
        yield from self.inputs
        if "norm_like" in self.args:
            yield TensorRef(*self.args["norm_like"].split(":", 1))
        for part in self.parts:
            yield from part.refs()

    def summary(self) -> str:
        """A short human description, e.g. ``mean(seed, code, law)``."""
        times = self.args.get("repeat")
        if times is not None:
            args = {k: v for k, v in self.args.items() if k != "repeat"}
            return f"{Recipe(self.op, self.inputs, args, self.parts).summary()}, rows x{times}"
        if self.op == "stack":
            inner = _shard_summaries(self.parts)
            if len(set(inner)) == 1:
                return f"stack({len(inner)} x {inner[0]})"
            return f"stack({', '.join(inner)})"
        if self.op == "slice":
            return f"slice({self.parts[0].summary()}, {_span(self.args)}){_times(self.args)}"
        if self.op == "init":
            init = self.args.get("init")
            if init == "zeros":
                return "zeros"
            if init == "constant":
                return f"constant({self.args['value']:g})"
            if init == "uniform":
                return f"uniform(+-{self.args['bound']:.3g})"
            return f"normal(std={self.args['std']:g})"
        names = ", ".join(r.source for r in self.inputs)
        if self.op == "copy" and "index" in self.args:
            return f"{names}[{self.args['index']}]"
        if self.op == "copy":
            scale = self.args.get("scale")
            return f"{names}" + (f" x {scale:g}" if scale not in (None, 1.0) else "")
        if self.op == "drop":
            return f"drop({names}, {self.args['rate']:g})"
        if self.op == "domain":
            return f"domain({self.args['name']})"
        if self.op == "nexus_gate":
            return f"nexus_gate({', '.join(p.args['name'] for p in self.parts)})"
        if self.op == "prompt_state":
            what = "documents" if "documents" in self.args else "prompts"
            count = len(self.args[what])
            return f"{what}({self.args['source']}, {count})"
        if self.op == "weighted":
            ws = ", ".join(f"{w:.3g}*{r.source}" for w, r in zip(self.args["weights"], self.inputs))
            return f"weighted({ws})"
        return f"{self.op}({names})"


def _span(args: dict[str, Any]) -> str:
    axis = "rows" if args["dim"] == 0 else "cols"
    return f"{axis} {args['start']}-{args['end'] - 1}"


def _times(args: dict[str, Any]) -> str:
    scale = args.get("scale")
    return f" x {scale:g}" if scale not in (None, 1.0) else ""


def _next_shard(prev: Recipe, part: Recipe) -> bool:
    """Whether ``part`` is the slice after ``prev``: the same recipe cut, the next span."""
    if prev.op != "slice" or part.op != "slice" or part.parts != prev.parts:
        return False
    a, b = prev.args["start"], prev.args["end"]
    return part.args == {**prev.args, "start": b, "end": 2 * b - a}


def _shard_summaries(parts: tuple[Recipe, ...]) -> list[str]:
    """Part summaries, each run of consecutive slices that cut one recipe into equal
    shards (a fine-grained expert) written once: ``seed in 4 col shards x 4``."""
    out: list[str] = []
    j = 0
    while j < len(parts):
        run = 1
        while j + run < len(parts) and _next_shard(parts[j + run - 1], parts[j + run]):
            run += 1
        part = parts[j]
        if run > 1:
            axis = "row" if part.args["dim"] == 0 else "col"
            out.append(f"{part.parts[0].summary()} in {run} {axis} shards{_times(part.args)}")
        else:
            out.append(part.summary())
        j += run
    return out


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    recipe: Recipe
    trainable: bool
    group: str  # embeddings | norms | attention | ffn | router | experts | shared
    layer: int | None = None
    active: float = 1.0  # fraction of this tensor's parameters used per token

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "recipe": self.recipe.to_data(),
            "trainable": self.trainable,
            "group": self.group,
            "layer": self.layer,
            "active": self.active,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> PlannedTensor:
        return cls(
            name=data["name"],
            shape=tuple(data["shape"]),
            dtype=data["dtype"],
            recipe=Recipe.from_data(data["recipe"]),
            trainable=data["trainable"],
            group=data["group"],
            layer=data.get("layer"),
            active=data.get("active", 1.0),
        )


@dataclass(frozen=True)
class Totals:
    params: int
    active_params: int
    trainable_params: int
    flops_per_token: int
    flops_context: int
    bytes: int
    kv_cache_bytes_per_token: int = 0  # all layers, in the output dtype


@dataclass(frozen=True)
class Plan:
    """Everything the build needs, and nothing it has to look up elsewhere."""

    name: str
    format: str
    format_reason: str
    dtype: str
    config: dict[str, Any]
    tensors: tuple[PlannedTensor, ...]
    sources: dict[str, dict[str, str]]  # name -> {path, fingerprint}
    tokenizer_source: str | None
    spec: dict[str, Any]
    totals: Totals
    layers: tuple[dict[str, Any], ...]  # per-layer summary rows
    warnings: tuple[str, ...] = ()
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> provenance
    derivations: tuple[dict[str, Any], ...] = ()  # artifacts this one was derived from

    def to_data(self) -> dict[str, Any]:
        return {
            "moecompose_plan": 1,
            "name": self.name,
            "format": self.format,
            "format_reason": self.format_reason,
            "dtype": self.dtype,
            "totals": asdict(self.totals),
            "layers": list(self.layers),
            "sources": self.sources,
            "tokenizer_source": self.tokenizer_source,
            "warnings": list(self.warnings),
            "domains": self.domains,
            "derivations": list(self.derivations),
            "config": self.config,
            "spec": self.spec,
            "tensors": [t.to_data() for t in self.tensors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_data(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Plan:
        return cls(
            name=data["name"],
            format=data["format"],
            format_reason=data["format_reason"],
            dtype=data["dtype"],
            config=data["config"],
            tensors=tuple(PlannedTensor.from_data(t) for t in data["tensors"]),
            sources=data["sources"],
            tokenizer_source=data.get("tokenizer_source"),
            spec=data["spec"],
            totals=Totals(**data["totals"]),
            layers=tuple(data["layers"]),
            warnings=tuple(data.get("warnings", ())),
            domains=data.get("domains", {}),
            derivations=tuple(data.get("derivations", ())),
        )

    def digest(self) -> str:
        """A hash of what the plan builds (recipes, shapes, config), independent of paths."""
        data = self.to_data()
        data["sources"] = {
            name: {k: v for k, v in src.items() if k != "path"} for name, src in self.sources.items()
        }
        data["domains"] = {
            name: {k: v for k, v in d.items() if k not in ("path", "documents")}
            for name, d in self.domains.items()
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
