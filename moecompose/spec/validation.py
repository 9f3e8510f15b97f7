"""Turn plain spec data into a ``Spec``, translating pydantic's errors into one located,
actionable line."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from moecompose.errors import SpecError, did_you_mean, one_of
from moecompose.spec.origin import DataPath, Origin, path_text
from moecompose.spec.schema import ROUTER_KINDS, Spec


def spec_from_data(data: Any, origin: Origin) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(
            "a spec must be a mapping with at least 'moecompose: 1' and 'sources'",
            location=origin.locate(()),
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, data, origin) from None
    spec._origin = origin
    return spec


def _data_path(loc: tuple[Any, ...], data: Any) -> DataPath:
    """Pydantic's loc with union tags and other non-data steps dropped."""
    path: list[str | int] = []
    node = data
    for step in loc:
        if isinstance(node, dict) and step in node:
            path.append(step)
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            path.append(step)
            node = node[step]
    return tuple(path)


def _describe(err: dict[str, Any], path: DataPath) -> tuple[str, str | None, bool]:
    """(message, hint, point at the key) for one pydantic error."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    where = path_text(path)
    if kind == "unknown_key":
        return f"unknown key '{ctx['key']}' in {where}", ctx["hint"], True
    if kind == "missing":
        return f"missing required key '{err['loc'][-1]}' in {where}", None, False
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",")]
        choices = [c for c in choices if c]
        hint = did_you_mean(value, choices) if isinstance(value, str) else None
        return f"{where}: expected {expected}, got {value!r}", hint, False
    if kind == "union_tag_invalid":
        tag = ctx.get("tag")
        if ctx.get("discriminator") == "'kind'":
            return (
                f"{where}: unknown router kind '{tag}'",
                did_you_mean(tag, ROUTER_KINDS) or f"expected one of {one_of(ROUTER_KINDS)}",
                False,
            )
        return f"{where}: unexpected value {tag!r}", f"expected {ctx.get('expected_tags')}", False
    if kind == "union_tag_not_found":
        return f"{where}: missing 'kind'", f"expected one of {one_of(ROUTER_KINDS)}", False
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    shown = "" if isinstance(value, (dict, list)) else f", got {value!r}"
    return f"{where}: {message[0].lower()}{message[1:]}{shown}", None, False


def _first_error(exc: ValidationError, data: Any, origin: Origin) -> SpecError:
    located = []
    for err in exc.errors():
        path = _data_path(err["loc"], data)
        if err["type"] == "unknown_key":
            path = (*path, err["ctx"]["key"])
        message, hint, at_key = _describe(err, path if err["type"] != "unknown_key" else path[:-1])
        location = origin.locate(path, key=at_key)
        located.append((location.line or 0, location.column or 0, message, hint, location))
    located.sort(key=lambda item: (item[0], item[1]))
    _, _, message, hint, location = located[0]
    if len(located) > 1:
        more = len(located) - 1
        message = f"{message} [+{more} more error{'s' if more > 1 else ''}]"
    return SpecError(message, location=location, hint=hint)
