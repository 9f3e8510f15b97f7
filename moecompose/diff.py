"""Semantic diff of two experiments: what changed in the spec, and what it costs.

Both sides are read into the spec IR (either syntax; an artifact through its
``spec.yaml`` and ``plan.json``), so key order, syntax and spelled-out defaults never
show up. Layer rules are expanded to each layer's effective settings and consecutive
layers with the same change are collapsed (``layers 0–11 ffn.router.k: 2 → 1``). When
both sides' sources can be read, their plans are compared too: totals, the output
format, and tensors added, removed or made by a different recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from moecompose.errors import BuildError, MoeComposeError
from moecompose.plan.recipe import Plan, PlannedTensor, Recipe, Totals
from moecompose.report import add_row, derivation_line, styled, table
from moecompose.spec import fields as F
from moecompose.spec import load_spec
from moecompose.spec.formatter import short
from moecompose.spec.origin import Origin
from moecompose.spec.schema import Spec
from moecompose.spec.validation import spec_from_data
from moecompose.text import ranges

__all__ = ["Change", "Diff", "PlanDiff", "TensorChange", "diff", "print_diff"]

TOTALS = {
    "params": "parameters",
    "active_params": "active parameters / token",
    "trainable_params": "trainable parameters",
    "flops_per_token": "FLOPs / token",
    "kv_cache_bytes_per_token": "KV cache bytes / token",
    "bytes": "weight bytes",
}


@dataclass(frozen=True)
class Change:
    """One setting that differs: ``path`` (``output.format``, or ``ffn.router.k`` for the
    ``layers`` it applies to), the old and the new value as plain data."""

    path: str
    old: Any
    new: Any
    layers: tuple[int, ...] | None = None
    open_end: bool = False  # the range runs to the last layer, whose index is not known

    @property
    def where(self) -> str:
        if self.layers is None:
            return ""
        return "layers " + ranges(self.layers, "–", self.open_end)

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "old": self.old, "new": self.new}
        if self.layers is not None:
            out["layers"] = list(self.layers)
            out["layer_range"] = ranges(self.layers, "–", self.open_end)
        return out


@dataclass(frozen=True)
class TensorChange:
    """An output tensor both plans have, made differently: field -> (old, new)."""

    name: str
    what: dict[str, tuple[Any, Any]]


@dataclass
class PlanDiff:
    totals: dict[str, tuple[int, int]]  # every total: (old, new)
    format: tuple[str, str] | None = None
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)
    source_contents: list[str] = field(default_factory=list)  # same path, other weights
    lineage: str | None = None  # how one side was made from the other (transition, train)

    @property
    def equal(self) -> bool:
        return (
            self.format is None and not self.added and not self.removed and not self.changed
            and not self.source_contents and all(a == b for a, b in self.totals.values())
        )

    def delta(self, total: str) -> int:
        old, new = self.totals[total]
        return new - old

    def to_data(self) -> dict[str, Any]:
        return {
            "compared": True,
            "totals": {k: {"old": a, "new": b, "delta": b - a} for k, (a, b) in self.totals.items()},
            "format": None if self.format is None else {"old": self.format[0], "new": self.format[1]},
            "tensors": {
                "added": self.added,
                "removed": self.removed,
                "changed": [
                    {"name": c.name, **{k: {"old": a, "new": b} for k, (a, b) in c.what.items()}}
                    for c in self.changed
                ],
            },
            "source_contents_changed": self.source_contents,
            "lineage": self.lineage,
        }


@dataclass
class Diff:
    """The differences between experiment ``a`` and experiment ``b``."""

    a: str
    b: str
    changes: list[Change]
    sources_added: dict[str, str]
    sources_removed: dict[str, str]
    plan: PlanDiff | None
    plan_skipped: str | None = None  # why the plans were not compared

    @property
    def equal(self) -> bool:
        return (
            not self.changes and not self.sources_added and not self.sources_removed
            and (self.plan is None or self.plan.equal)
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "changes": [c.to_data() for c in self.changes],
            "sources": {"added": self.sources_added, "removed": self.sources_removed},
            "plan": self.plan.to_data() if self.plan is not None
            else {"compared": False, "reason": self.plan_skipped},
        }


# ----------------------------------------------------------------------------- sides


@dataclass
class _Side:
    label: str
    spec: Spec
    plan: Plan | None
    plan_error: str | None = None


def _side(x: Spec | str | Path) -> _Side:
    from moecompose.plan import plan
    from moecompose.resolve import resolve

    if isinstance(x, Spec):
        spec, label = x, x.origin.file or "<spec>"
    else:
        path = Path(x)
        label = str(path)
        if path.is_dir():
            return _artifact(path)
        spec = load_spec(path, check=False)  # checks run with the plan, below
    try:
        return _Side(label, spec, plan(resolve(spec)))
    except MoeComposeError as exc:
        return _Side(label, spec, None, exc.format())


def _artifact(path: Path) -> _Side:
    from moecompose.artifact import read_plan

    if not (path / "plan.json").is_file():
        raise BuildError(f"{path} is a folder without plan.json",
                         hint="give a spec file or a folder written by 'moecompose build'")
    the_plan = read_plan(path)
    spec_file = path / "spec.yaml"
    if spec_file.is_file():
        spec = load_spec(spec_file, check=False)
    else:
        spec = spec_from_data(the_plan.spec, Origin(str(path / "plan.json"), path.resolve()))
    return _Side(str(path), spec, the_plan)


# ------------------------------------------------------------------------------ diff


def diff(a: Spec | str | Path, b: Spec | str | Path) -> Diff:
    """Compare two experiments: specs (``Spec`` objects or files in either syntax) or built
    artifact folders. Plans are compared when both sides' sources can be read."""
    left, right = _side(a), _side(b)
    both = left.plan is not None and right.plan is not None
    data_a, data_b = _data(left, both), _data(right, both)
    if left.spec.name is None or right.spec.name is None:  # a default name is the file's
        data_a.pop("name", None)
        data_b.pop("name", None)

    changes: list[Change] = []
    src_a, src_b = data_a.pop("sources"), data_b.pop("sources")
    for name in src_a.keys() & src_b.keys():
        if src_a[name] != src_b[name]:
            changes.append(Change(f"sources.{name}", src_a[name], src_b[name]))
    added = {k: v for k, v in src_b.items() if k not in src_a}
    removed = {k: v for k, v in src_a.items() if k not in src_b}

    rules_a, rules_b = data_a.pop("layers", []) or [], data_b.pop("layers", []) or []
    for path, old, new in _changes(data_a, data_b, Spec, ()):
        changes.append(Change(path, old, new))
    changes += _layer_changes(rules_a, rules_b, left.plan, right.plan)

    plan_diff, skipped = None, None
    if both:
        assert left.plan is not None and right.plan is not None
        plan_diff = _plan_diff(left.plan, right.plan)
    else:
        reasons = [f"{s.label}: {s.plan_error}" for s in (left, right) if s.plan_error]
        skipped = "; ".join(reasons) or "no plan"
    return Diff(left.label, right.label, changes, added, removed, plan_diff, skipped)


def _data(side: _Side, normalised: bool) -> dict[str, Any]:
    """The side's spec as plain data. With both plans at hand, the plans' normalised specs
    (every choice the sources decide filled in); else the IR's data with its paths
    (sources, domain texts and embeddings) made absolute, as a normalised spec has them."""
    if normalised and side.plan is not None:
        data = json.loads(json.dumps(side.plan.spec))
        data.setdefault("name", side.spec.name)
        return data
    data = side.spec.to_data()
    data["sources"] = {name: _absolute(side.spec, raw) for name, raw in data["sources"].items()}
    for domain in (data.get("domains") or {}).values():
        for key in ("texts", "embedding"):
            if domain.get(key) is not None:
                domain[key] = _absolute(side.spec, domain[key], pattern=key == "texts")
    return data


def _absolute(spec: Spec, raw: str, *, pattern: bool = False) -> str:
    from moecompose.resolve import spec_path

    try:
        return str(spec_path(spec, raw, pattern=pattern))
    except (OSError, RuntimeError, ValueError):  # unknown ~user, NUL byte, loops
        return raw


def _changes(a: Any, b: Any, tp: Any, path: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """Leaves that differ, by dotted path. Mappings of the same model are compared field by
    field; a value whose form changes (topk -> soft, list -> copy(...)) is one change."""
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        models = F.models_of(tp)
        model_a, model_b = F.which_model(a, models), F.which_model(b, models)
        if model_a is model_b and (model_a is not None or F.dict_value(tp) is not None):
            out = []
            keys = list(a) + [k for k in b if k not in a]
            for key in keys:
                key_tp = F.field_type([model_a], key) if model_a is not None else F.dict_value(tp)
                out += _changes(a.get(key), b.get(key), key_tp, (*path, key))
            return out
    return [(".".join(path), a, b)]


def _rule_model() -> tuple[Any, str, list[str]]:
    """The layer rule model, its selecting field, and its parts (ffn, attention, ...)."""
    rule = F.models_of(F.list_item(F.field_type([Spec], "layers")))[0]
    names = [name for name, _ in F.fields(rule)]
    return rule, names[0], names[1:]


def _selected(select: Any, n: int) -> list[int]:
    if select == "all":
        return list(range(n))
    if isinstance(select, list):
        return [i for i in select if isinstance(i, int) and 0 <= i < n]
    if isinstance(select, dict):
        end = select.get("to")
        end = n if end is None else min(end, n)
        return list(range(select.get("from", 0), end, select.get("every", 1)))
    return []


def _depth(rules: list[dict[str, Any]]) -> tuple[int, bool]:
    """A layer count to expand rules over when the sources are unknown, and whether some
    rule runs to the (unknown) last layer."""
    _, head, _ = _rule_model()
    bound, step, open_end = 0, 1, False
    for rule in rules:
        select = rule.get(head)
        if select == "all":
            open_end = True
        elif isinstance(select, list):
            bound = max([bound, *(i + 1 for i in select if isinstance(i, int))])
        elif isinstance(select, dict):
            bound = max(bound, select.get("from", 0) + 1)
            if select.get("to") is None:
                open_end, step = True, math.lcm(step, select.get("every", 1))
            else:
                bound = max(bound, select["to"])
    return bound + (step if open_end else 0), open_end


def _per_layer(rules: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Each layer's effective parts: later rules override earlier ones, part by part."""
    _, head, parts = _rule_model()
    layers: list[dict[str, Any]] = [dict.fromkeys(parts) for _ in range(n)]
    for rule in rules:
        for i in _selected(rule.get(head), n):
            for part in parts:
                if rule.get(part) is not None:
                    layers[i][part] = rule[part]
    return layers


def _layer_changes(rules_a: list[dict[str, Any]], rules_b: list[dict[str, Any]],
                   plan_a: Plan | None, plan_b: Plan | None) -> list[Change]:
    rule, _, parts = _rule_model()
    if plan_a is not None and plan_b is not None:
        n_a, n_b, open_end = len(plan_a.layers), len(plan_b.layers), False
    else:
        depth_a, open_a = _depth(rules_a)
        depth_b, open_b = _depth(rules_b)
        n_a = n_b = max(depth_a, depth_b)
        open_end = open_a or open_b
    n = max(n_a, n_b)
    layers_a, layers_b = _per_layer(rules_a, n_a), _per_layer(rules_b, n_b)
    empty = dict.fromkeys(parts)
    runs: dict[tuple[str, str, str], list[list[int]]] = {}
    values: dict[tuple[str, str, str], tuple[Any, Any]] = {}
    order: list[tuple[int, int, tuple[str, str, str]]] = []
    for i in range(n):
        a = layers_a[i] if i < n_a else empty
        b = layers_b[i] if i < n_b else empty
        for j, part in enumerate(parts):
            for path, old, new in _changes(a[part], b[part], F.field_type([rule], part), (part,)):
                key = (path, json.dumps(old, sort_keys=True), json.dumps(new, sort_keys=True))
                spans = runs.setdefault(key, [])
                if spans and spans[-1][-1] == i - 1:
                    spans[-1].append(i)
                else:
                    spans.append([i])
                    order.append((i, j, key))
                values[key] = (old, new)
    out = []
    seen: dict[tuple[str, str, str], int] = {}
    for _, _, key in sorted(order, key=lambda t: (t[0], t[1])):
        span = runs[key][seen.get(key, 0)]
        seen[key] = seen.get(key, 0) + 1
        old, new = values[key]
        out.append(Change(key[0], old, new, tuple(span), open_end and span[-1] == n - 1))
    if n_a != n_b:
        out.append(Change("num_layers", n_a, n_b))
    return out


def _plan_diff(a: Plan, b: Plan) -> PlanDiff:
    totals = {
        f.name: (getattr(a.totals, f.name), getattr(b.totals, f.name))
        for f in dataclasses.fields(Totals)
        if f.name != "flops_context"
    }
    out = PlanDiff(totals, None if a.format == b.format else (a.format, b.format))
    tensors_a = {t.name: t for t in a.tensors}
    tensors_b = {t.name: t for t in b.tensors}
    if _derived(b, a):
        tensors_b = {n: replace(t, recipe=_inline(t.recipe, tensors_a)) for n, t in tensors_b.items()}
        out.lineage = derivation_line(b.derivations[-1], "B", "A")
    elif _derived(a, b):
        tensors_a = {n: replace(t, recipe=_inline(t.recipe, tensors_b)) for n, t in tensors_a.items()}
        out.lineage = derivation_line(a.derivations[-1], "A", "B")
    out.added = [name for name in tensors_b if name not in tensors_a]
    out.removed = [name for name in tensors_a if name not in tensors_b]
    for name, old in tensors_a.items():
        new = tensors_b.get(name)
        if new is not None:
            what = _tensor_change(old, new)
            if what:
                out.changed.append(TensorChange(name, what))
    for name in a.sources.keys() & b.sources.keys():
        if a.sources[name].get("fingerprint") != b.sources[name].get("fingerprint"):
            out.source_contents.append(name)
    return out


def _derived(child: Plan, parent: Plan) -> bool:
    """Whether ``child`` was derived (transition, extend) from the artifact ``parent`` plans."""
    last = child.derivations[-1] if child.derivations else {}
    return last.get("from_plan_digest") == parent.digest()


def _inline(recipe: Recipe, base: dict[str, PlannedTensor]) -> Recipe:
    """``recipe`` of a derived plan with each plain copy of a tensor (or expert) of the
    artifact it read as ``@base`` replaced by the recipe that made that tensor, so tensors
    carried over unchanged compare equal to the artifact's."""
    from moecompose.extend import BASE

    if recipe.op == "copy" and len(recipe.inputs) == 1 and recipe.inputs[0].source == BASE:
        made = base.get(recipe.inputs[0].tensor)
        if made is not None and not recipe.args:
            return made.recipe
        index = recipe.args.get("index")
        if (made is not None and set(recipe.args) == {"index"} and made.recipe.op == "stack"
                and index < len(made.recipe.parts)):
            return made.recipe.parts[index]
    if recipe.parts:
        return replace(recipe, parts=tuple(_inline(p, base) for p in recipe.parts))
    return recipe


def _canonical(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe with the inputs of order-free ops sorted: the sources' order in the spec
    (a mapping) does not change what a mean is."""
    out = dict(recipe)
    if out.get("op") == "mean" and "inputs" in out:
        out["inputs"] = sorted(out["inputs"])
    elif out.get("op") == "weighted" and "inputs" in out and "weights" in out:
        pairs = sorted(zip(out["inputs"], out["weights"]))
        out["inputs"], out["weights"] = [p[0] for p in pairs], [p[1] for p in pairs]
    if "parts" in out:
        out["parts"] = [_canonical(p) for p in out["parts"]]
    return out


def _tensor_change(a: PlannedTensor, b: PlannedTensor) -> dict[str, tuple[Any, Any]]:
    what: dict[str, tuple[Any, Any]] = {}
    if a.shape != b.shape:
        what["shape"] = (list(a.shape), list(b.shape))
    if a.dtype != b.dtype:
        what["dtype"] = (a.dtype, b.dtype)
    if _canonical(a.recipe.to_data()) != _canonical(b.recipe.to_data()):
        what["recipe"] = (a.recipe.summary(), b.recipe.summary())
        if what["recipe"][0] == what["recipe"][1]:  # same summary, other seed or tensor
            what["recipe"] = (json.dumps(a.recipe.to_data()), json.dumps(b.recipe.to_data()))
    if a.trainable != b.trainable:
        what["trainable"] = (a.trainable, b.trainable)
    return what


# ----------------------------------------------------------------------------- print


def _show(value: Any, path: str) -> str:
    if value is None:
        part = path.split(".")[0]
        return "dense" if part in _rule_model()[2] and "." not in path else "(none)"
    tp = _path_type(path)
    try:
        return short(value, tp)
    except ValueError:
        return repr(value)


def _path_type(path: str) -> Any:
    """The schema type at a dotted change path (top level or inside a layer rule)."""
    rule, _, parts = _rule_model()
    steps = path.split(".")
    tp: Any = rule if steps[0] in parts else Spec
    for step in steps:
        models = F.models_of(tp)
        tp = F.field_type(models, step) if models else F.dict_value(tp)
        if tp is None:
            return None
    return tp


def _grouped(names: list[str]) -> list[str]:
    """Tensor names with their layer index collapsed: ``model.layers.{0–3}.mlp.gate``."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match is None:
            groups.setdefault(name, [])
            continue
        pattern = name[: match.start(1)] + "{}" + name[match.end(1):]
        groups.setdefault(pattern, []).append(int(match.group(1)))
    out = []
    for pattern, layers in groups.items():
        if not layers:
            out.append(pattern)
        elif len(layers) == 1:
            out.append(pattern.replace("{}", str(layers[0])))
        else:
            out.append(pattern.replace("{}", "{" + ranges(sorted(layers), "–") + "}"))
    return out


def _human(n: float) -> str:
    from moecompose.report import human

    return human(n)


def print_diff(result: Diff, console: Console, *, max_tensors: int = 12) -> None:
    """The diff as rich tables: settings, sources, plan consequences."""
    console.print(styled(("A", "bold"), f" {result.a}\n", ("B", "bold"), f" {result.b}"),
                  soft_wrap=True)
    if result.equal:
        console.print(styled(("A and B describe the same model", "green")))
        if result.plan is None:
            console.print(styled(("plans not compared:", "yellow"), f" {result.plan_skipped}"),
                          soft_wrap=True)
        return
    if result.changes or result.sources_added or result.sources_removed:
        settings = table("Spec", ["where", "setting", "A", "B"])
        for name, path in result.sources_added.items():
            add_row(settings, "", f"sources.{name}", "", Text(f"added {path}", style="green"))
        for name, path in result.sources_removed.items():
            add_row(settings, "", f"sources.{name}", path, Text("removed", style="red"))
        for change in result.changes:
            add_row(settings, change.where, change.path, _show(change.old, change.path),
                    _show(change.new, change.path))
        console.print(settings)
    if result.plan is None:
        console.print(styled(("plan comparison skipped:", "yellow"), f" {result.plan_skipped}"),
                      soft_wrap=True)
        return
    plan = result.plan
    if plan.lineage is not None:
        console.print(styled((plan.lineage, "bold")), soft_wrap=True)
    if plan.equal:
        console.print(styled(("the plans are the same", "green"),
                             " (same tensors, recipes and totals)"))
        return
    totals = table("Plan", ["", "A", "B", "change"])
    for column in totals.columns[1:]:
        column.justify = "right"
    if plan.format is not None:
        add_row(totals, "format", plan.format[0], plan.format[1], "")
    for key, label in TOTALS.items():
        old, new = plan.totals[key]
        if old == new:
            continue
        change = new - old
        percent = f" ({100 * change / old:+.1f}%)" if old else ""
        add_row(totals, label, f"{old:,}", f"{new:,}",
                f"{'+' if change > 0 else ''}{_human(change)}{percent}")
    for name in plan.source_contents:
        add_row(totals, f"source {name}", "", "other weights", "")
    if totals.row_count:
        console.print(totals)
    for title, names, style in (("added", plan.added, "green"), ("removed", plan.removed, "red")):
        if names:
            grouped = _grouped(names)
            console.print(styled((f"{len(names)} tensor(s) {title}", style)))
            for line in grouped[:max_tensors]:
                console.print(Text(f"  {line}"), soft_wrap=True)
            if len(grouped) > max_tensors:
                console.print(f"  ... {len(grouped) - max_tensors} more")
    if plan.changed:
        console.print(styled((f"{len(plan.changed)} tensor(s) made differently", "yellow")))
        by_change: dict[str, list[str]] = {}
        for change in plan.changed:
            text = "; ".join(f"{k}: {_plain(a)} → {_plain(b)}" for k, (a, b) in change.what.items())
            by_change.setdefault(text, []).append(change.name)
        lines = [f"{name}  {text}" for text, names in by_change.items() for name in _grouped(names)]
        for line in lines[:max_tensors]:
            console.print(Text(f"  {line}"), soft_wrap=True)
        if len(lines) > max_tensors:
            console.print(f"  ... {len(lines) - max_tensors} more")


def _plain(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)
