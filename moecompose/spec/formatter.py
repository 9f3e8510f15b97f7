"""``Spec`` -> canonical text, in either syntax.

The canonical form is the spec's plain data (``Spec.to_data``) with every value that
equals its default left out (``full=True`` keeps them), keys in schema order. Which text
form a value takes (``topk(k=2)``, ``copy(base, count=8)``, ``0..4 every 2``) follows from
the schema at its position, the same way the parser reads it back, so
``parse(format(spec)) == spec`` for both syntaxes.

The comments of the text a spec was parsed from (kept on its ``Origin``) are written back
at the same data paths, in either syntax; :mod:`moecompose.spec.comments` has the rules.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml

from moecompose.spec import comments as C
from moecompose.spec import fields as F
from moecompose.spec.origin import DataPath
from moecompose.spec.schema import Spec

__all__ = ["format_dsl", "format_spec", "format_yaml", "inline", "pruned", "short"]

WIDTH = 100
INDENT = "  "
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_PATH = re.compile(r"[A-Za-z0-9_.~*+@%-]*/[^\s,;\[\]{}()=#\"']*")
_RESERVED = {"true", "false", "null", "every"}
_RANGE_KEYS = {"from", "to", "every"}


def format_spec(spec: Spec, syntax: str, *, full: bool = False, comments: bool = True) -> str:
    """The canonical text of ``spec`` in ``syntax`` (``yaml`` or ``dsl``), with the
    comments of the text it was parsed from unless ``comments`` is false."""
    if syntax == "yaml":
        return format_yaml(spec, full=full, comments=comments)
    if syntax == "dsl":
        return format_dsl(spec, full=full, comments=comments)
    raise ValueError(f"syntax must be 'yaml' or 'dsl', got {syntax!r}")


def format_yaml(spec: Spec, *, full: bool = False, comments: bool = True) -> str:
    """:func:`format_spec` in YAML."""
    data = pruned(spec.to_data(), Spec, full=full)
    attached = _attached(spec, data) if comments else []
    text = yaml.dump(_yaml_layout(data, C.holders(attached)), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=None, width=WIDTH, allow_unicode=True)
    if not attached:
        return text
    from moecompose.spec.yaml_front import parse_yaml

    return C.weave(text, attached, parse_yaml(text).origin, C.yaml_scalar_lines(text))


def format_dsl(spec: Spec, *, full: bool = False, comments: bool = True) -> str:
    """:func:`format_spec` in the ``.moe`` syntax."""
    data = pruned(spec.to_data(), Spec, full=full)
    attached = _attached(spec, data) if comments else []
    text = "\n".join(_lines(data, Spec, 0, (), C.holders(attached))) + "\n"
    if not attached:
        return text
    from moecompose.spec.dsl import parse_dsl

    return C.weave(text, attached, parse_dsl(text).origin)


def _attached(spec: Spec, data: dict[str, Any]) -> list[C.Attached]:
    """The comments of the text ``spec`` was parsed from, attached to paths of ``data``."""
    if not spec.origin.comments:
        return []
    return C.attach(spec.origin, C.data_paths(data))


class _BlockMapping(dict[str, Any]):
    """A mapping YAML writes one key per line."""


class _BlockSequence(list[Any]):
    """A sequence YAML writes one item per line."""


class _Dumper(yaml.SafeDumper):
    """``yaml.safe_dump``'s writer, which also writes the two block types above."""


_Dumper.add_representer(
    _BlockMapping, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=False))
_Dumper.add_representer(
    _BlockSequence, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=False))


def _yaml_layout(data: Any, expand: frozenset[DataPath], path: DataPath = ()) -> Any:
    """``data`` with the collections at ``expand`` marked to be written one entry per line."""
    if not expand:
        return data
    if isinstance(data, dict):
        out = {k: _yaml_layout(v, expand, (*path, k)) for k, v in data.items()}
        return _BlockMapping(out) if path in expand else out
    if isinstance(data, list):
        items = [_yaml_layout(v, expand, (*path, i)) for i, v in enumerate(data)]
        return _BlockSequence(items) if path in expand else items
    return data


# ----------------------------------------------------------------------------- data


def pruned(data: Any, tp: Any, *, full: bool = False) -> Any:
    """``data`` (of schema type ``tp``) without the values equal to their defaults."""
    if isinstance(data, dict):
        model = F.which_model(data, F.models_of(tp))
        if model is None:
            value_tp = F.dict_value(tp)
            return {k: pruned(v, value_tp, full=full) for k, v in data.items()}
        out = {}
        for key, f in F.fields(model):
            if key not in data:
                continue
            value = data[key]
            if not full and not f.is_required() and value == F.default_data(f):
                continue
            out[key] = pruned(value, f.annotation, full=full)
        return out
    if isinstance(data, list):
        item = F.list_item(tp)
        return [pruned(v, item, full=full) for v in data]
    return data


# ----------------------------------------------------------------------------- text


def _key(key: str) -> str:
    if _NAME.fullmatch(key) and key not in _RESERVED:
        return key
    return json.dumps(key, ensure_ascii=False)


def _text(value: str) -> str:
    if (_NAME.fullmatch(value) or _PATH.fullmatch(value)) and value not in _RESERVED:
        return value
    return json.dumps(value, ensure_ascii=False)


def _number(value: float) -> str:
    if math.isnan(value):
        raise ValueError("NaN cannot be written in a spec")
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value)


def _kwargs(data: dict[str, Any], model: Any) -> list[str]:
    out = []
    for key, value in data.items():
        field_tp = F.field_type([model], key) if model is not None else None
        out.append(f"{_key(key)}={inline(value, field_tp)}")
    return out


def inline(value: Any, tp: Any = None) -> str:
    """One value in the text syntax, on one line, as the parser reads it at type ``tp``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        item = F.list_item(tp)
        return "[" + ", ".join(inline(v, item) for v in value) + "]"
    if isinstance(value, dict):
        models = F.models_of(tp)
        model = F.which_model(value, models)
        if model is None:
            value_tp = F.dict_value(tp)
            if not value:
                return "{}"
            return "{" + "; ".join(f"{_key(k)} = {inline(v, value_tp)}" for k, v in value.items()) + "}"
        return _model_inline(value, tp, model, models)
    return _text(str(value))


def short(value: Any, tp: Any = None) -> str:
    """A value as a reader would write it: defaults left out, no outer parentheses."""
    text = inline(pruned(value, tp), tp)
    if text.startswith("(") and text.endswith(")"):
        return text[1:-1]
    return text


def _model_inline(value: dict[str, Any], tp: Any, model: Any, models: list[Any]) -> str:
    keys = {name for name, _ in F.fields(model)}
    if keys == _RANGE_KEYS and set(value) <= keys and isinstance(value.get("from", 0), int):
        text = f"{value.get('from', 0)}..{'' if value.get('to') is None else value['to']}"
        every = value.get("every", 1)
        return text if every == 1 else f"{text} every {every}"
    if "kind" in value and F.kind_values(model):
        rest = {k: v for k, v in value.items() if k != "kind"}
        bare = (
            all(F.kind_values(m) for m in models)
            and value["kind"] not in F.literals_of(tp)
            and not F.takes(tp, str)
            and _NAME.fullmatch(str(value["kind"]))
            and value["kind"] not in _RESERVED
        )
        if not rest and bare:
            return str(value["kind"])
        if not isinstance(value["kind"], str) or not _NAME.fullmatch(value["kind"]):
            return "(" + ", ".join(_kwargs(value, model)) + ")"
        return f"{value['kind']}(" + ", ".join(_kwargs(rest, model)) + ")"
    head, head_field = F.fields(model)[0]
    if (len(models) > 1 or F.literals_of(tp)) and F.head_model(models, head) is model and head in value:
        rest = {k: v for k, v in value.items() if k != head}
        head_tp = head_field.annotation
        if F.dict_value(head_tp) is not None and isinstance(value[head], dict) and value[head] and not rest:
            return f"{head}(" + ", ".join(_kwargs(value[head], None)) + ")"
        args = [inline(value[head], head_tp), *_kwargs(rest, model)]
        return f"{head}(" + ", ".join(args) + ")"
    return "(" + ", ".join(_kwargs(value, model)) + ")"


def _lines(data: dict[str, Any], model: Any, depth: int, path: DataPath = (),
           expand: frozenset[DataPath] = frozenset()) -> list[str]:
    """The lines of a mapping of ``model``'s fields, at ``depth`` levels of indentation;
    the mappings at ``expand`` are written one key per line."""
    out: list[str] = []
    for key, value in data.items():
        field_tp = F.field_type([model], key)
        item = F.list_item(field_tp)
        item_models = F.models_of(item) if item is not None else []
        if item_models and isinstance(value, list) and value and len(item_models) == 1:
            out += _rule_lines(key, value, item_models[0], depth, (*path, key), expand)
            continue
        out += _entry(key, value, field_tp, depth, (*path, key), expand)
    return out


def _rule_lines(key: str, items: list[dict[str, Any]], model: Any, depth: int, path: DataPath,
                expand: frozenset[DataPath]) -> list[str]:
    """``layers all { ... }``: one line per item, its first field written first."""
    pad = INDENT * depth
    head, head_field = F.fields(model)[0]
    out = []
    for i, item in enumerate(items):
        if head not in item or not head_field.is_required():
            out.append(f"{pad}{_key(key)} [{inline(item, model)}]")
            continue
        rest = {k: v for k, v in item.items() if k != head}
        first = f"{pad}{_key(key)} {inline(item[head], head_field.annotation)}"
        if not rest:
            out.append(first)
            continue
        out.append(first + " {")
        out += _lines(rest, model, depth + 1, (*path, i), expand)
        out.append(pad + "}")
    return out


def _entry(key: str, value: Any, tp: Any, depth: int, path: DataPath = (),
           expand: frozenset[DataPath] = frozenset()) -> list[str]:
    pad = INDENT * depth
    models = F.models_of(tp)
    if isinstance(value, dict) and value:
        model = F.which_model(value, models)
        if model is None:  # free-key mapping: { name = value; ... }
            line = f"{pad}{_key(key)} {inline(value, tp)}"
            if len(line) <= WIDTH and path not in expand:
                return [line]
            value_tp = F.dict_value(tp)
            body = []
            for k, v in value.items():
                nested = _entry(k, v, value_tp, depth + 1, (*path, k), expand)
                if (*path, k) in expand and len(nested) > 1:
                    body += nested
                else:
                    body.append(f"{pad}{INDENT}{_key(k)} = {inline(v, value_tp)}")
            return [f"{pad}{_key(key)} {{", *body, pad + "}"]
        text = inline(value, tp)
        if not text.startswith("("):  # topk(k=2), copy(base, count=8), 0..4
            return [f"{pad}{_key(key)} {text}"]
        line = f"{pad}{_key(key)} " + " ".join(_kwargs(value, model))
        if len(line) <= WIDTH and path not in expand:
            return [line]
        return [f"{pad}{_key(key)} {{", *_lines(value, model, depth + 1, path, expand), pad + "}"]
    return [f"{pad}{_key(key)} {inline(value, tp)}"]
