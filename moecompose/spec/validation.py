"""Turn plain spec data into a ``Spec``, translating pydantic's errors into one located,
actionable line."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from moecompose.errors import SpecError, did_you_mean, one_of
from moecompose.spec.origin import DataPath, Origin, path_text
from moecompose.spec.schema import ROUTER_KINDS, Spec

FORMAT_VERSION = 1
M = TypeVar("M", bound=BaseModel)

# Hints for required keys a spec most often forgets.
_MISSING_HINTS = {
    ("moecompose",): "start the spec with 'moecompose: 1'",
    ("sources",): "add 'sources: {NAME: PATH}' naming at least one dense checkpoint folder",
}


def spec_from_data(data: Any, origin: Origin) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(
            f"a spec must be a mapping of keys to values, not {_kind_of(data)}",
            location=origin.locate(()),
            hint="write at least 'moecompose: 1' and 'sources: {NAME: PATH}'",
        )
    _check_version(data, origin)
    spec = validate_as(Spec, data, origin)
    spec._origin = origin
    return spec


def validate_as(model: type[M], data: Any, origin: Origin) -> M:
    """``data`` as an instance of the pydantic ``model``; the first problem (in text order)
    is raised as one located ``SpecError``, the others counted."""
    _refuse_nul(data, (), origin)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, data, origin) from None


def _refuse_nul(value: Any, path: DataPath, origin: Origin) -> None:
    """No name, path or text in a spec may hold a NUL character (no file system or model
    name can); refused where it is written, before any path is used."""
    if isinstance(value, str) and "\x00" in value:
        raise SpecError("text with a NUL character (\\0) is not allowed here",
                        location=origin.locate(path), hint="remove the \\0 escape")
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            raise SpecError("a key with a NUL character (\\0) is not allowed",
                            location=origin.locate((*path, key), key=True))
        _refuse_nul(item, (*path, key), origin)


def _check_version(data: dict[Any, Any], origin: Origin) -> None:
    """The format version comes first: a spec of another version is not read any further."""
    if "moecompose" not in data:
        return
    version = data["moecompose"]
    if type(version) is int and version == FORMAT_VERSION:
        return
    where = origin.locate(("moecompose",))
    if type(version) is int and version > FORMAT_VERSION:
        raise SpecError(
            f"spec format version {version} is newer than this moecompose reads",
            location=where,
            hint=f"upgrade moecompose, or write a version {FORMAT_VERSION} spec: "
            f"'moecompose: {FORMAT_VERSION}'",
        )
    raise SpecError(
        f"unknown spec format version {_show(version)}",
        location=where,
        hint=f"write 'moecompose: {FORMAT_VERSION}'",
    )


def _kind_of(value: Any) -> str:
    """What a YAML value is, in the words a spec author uses."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return type(value).__name__


def _show(value: Any) -> str:
    if value is None:
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _data_path(loc: tuple[Any, ...], data: Any) -> DataPath:
    """Pydantic's loc with union tags and other non-data steps dropped."""
    path: list[str | int] = []
    node = data
    for step in loc:
        if (isinstance(node, dict) and step in node) or (isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)):
            path.append(step)
            node = node[step]
    return tuple(path)


def _bound(kind: str, ctx: dict[str, Any]) -> str | None:
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    return None


# Common spellings of enum values -> the spelling a spec uses.
_ALIASES = {
    "fp32": "float32", "f32": "float32", "float": "float32",
    "bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16",
    "top_k": "topk", "top-k": "topk", "qwen2moe": "qwen2_moe", "qwen2-moe": "qwen2_moe",
}

# pydantic type errors -> what the value should have been
_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "list_type": "a list",
    "byte_size": "a size such as 2GB or 500MB",
    "byte_size_unit": "a size such as 2GB or 500MB",
}


def _describe(err: dict[str, Any], path: DataPath) -> tuple[str, str | None, bool]:
    """(message, hint, point at the key) for one pydantic error."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    where = path_text(path)
    if kind == "unknown_key":
        place = "" if not path else f" in {where}"
        what = "top-level key" if not path else "key"
        return f"unknown {what} '{ctx['key']}'{place}", ctx["hint"], True
    if kind == "missing":
        key = err["loc"][-1]
        place = "" if not path else f" in {where}"
        return (
            f"missing required key '{key}'{place}",
            _MISSING_HINTS.get((*path, key)),
            False,
        )
    if "[key]" in err["loc"]:
        name = err["loc"][err["loc"].index("[key]") - 1]
        parent = path_text(path[:-1])
        return (
            f"{parent}: {name!r} is not a valid name",
            "use letters, digits, '_', '.' and '-', starting with a letter or '_'",
            True,
        )
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",")]
        choices = [c for c in choices if c]
        hint = None
        if isinstance(value, str):
            alias = _ALIASES.get(value.lower())
            hint = f"did you mean '{alias}'?" if alias in choices else did_you_mean(value, choices)
        return f"{where}: expected {expected}, got {_show(value)}", hint, False
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        if ctx.get("discriminator") == "'kind'":
            alias = _ALIASES.get(str(tag).lower())
            return (
                f"{path_text(path[:-1])}: unknown router kind '{tag}'",
                (f"did you mean '{alias}'?" if alias in ROUTER_KINDS else None)
                or did_you_mean(tag, ROUTER_KINDS)
                or f"expected one of {one_of(ROUTER_KINDS)}",
                False,
            )
        return f"{where}: unexpected value {tag!r}", f"expected {ctx.get('expected_tags')}", False
    if kind == "union_tag_not_found":
        return f"{where}: missing 'kind'", f"expected one of {one_of(ROUTER_KINDS)}", False
    bound = _bound(kind, ctx)
    if bound is not None:
        return f"{where} {bound}, got {_show(value)}", None, False
    if kind == "string_type" and len(path) == 2 and path[0] == "sources":
        return (
            f"{where}: expected the path of a model folder, got {_kind_of(value)}",
            "write NAME: PATH, e.g. seed: ./dense/seed",
            False,
        )
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {_kind_of(value)}", None, False
    if kind == "string_pattern_mismatch":
        return f"{where}: {value!r} does not have the expected form", None, False
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        things = "entry" if least == 1 else "entries"
        hint = _MISSING_HINTS.get(path) if path == ("sources",) else None
        return f"{where} must have at least {least} {things}", hint, False
    if kind == "too_long":
        return f"{where} must have at most {ctx.get('max_length')} entries", None, False
    if kind == "empty_range":
        return (
            f"{where}: empty layer range, to: {ctx.get('to')} is not greater than "
            f"from: {ctx.get('start')}",
            "'to' is exclusive: {from: 2, to: 3} selects layer 2 only",
            False,
        )
    if kind == "empty_rule":
        return (
            f"{where}: a layer rule needs an 'ffn' section",
            "add 'ffn:' with experts and a router",
            False,
        )
    if kind == "zero_weights":
        return (
            f"{where}: the merge weights sum to 0",
            "give at least one source a positive weight",
            False,
        )
    message = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if message.startswith("Input should be "):
        message = "expected " + message[len("Input should be ") :]
    shown = "" if isinstance(value, (dict, list)) else f", got {_show(value)}"
    return f"{where}: {message[0].lower()}{message[1:]}{shown}", None, False


def _first_error(exc: ValidationError, data: Any, origin: Origin) -> SpecError:
    located = []
    for err in exc.errors():
        path = _data_path(err["loc"], data)
        if err["type"] == "unknown_key":
            path = (*path, err["ctx"]["key"])
        elif err["type"] == "zero_weights":
            path = (*path, "weights")
        elif "at" in (err.get("ctx") or {}):  # a model's check about one of its keys
            path = (*path, err["ctx"]["at"])
        elif err["type"] == "union_tag_invalid" and (err.get("ctx") or {}).get(
            "discriminator"
        ) == "'kind'":
            path = (*path, "kind")
        message, hint, at_key = _describe(err, path if err["type"] != "unknown_key" else path[:-1])
        if err.get("input", "") is None and path in origin.keys:
            at_key = True  # an empty value has no text of its own: point at its key
        location = origin.locate(path, key=at_key)
        located.append((location.line or 0, location.column or 0, message, hint, location))
    located.sort(key=lambda item: (item[0], item[1]))
    _, _, message, hint, location = located[0]
    if len(located) > 1:
        more = len(located) - 1
        message = f"{message} [+{more} more error{'s' if more > 1 else ''}]"
    return SpecError(message, location=location, hint=hint)
