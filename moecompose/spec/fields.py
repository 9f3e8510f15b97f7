"""What the spec models say about one position in a spec: which forms of value it takes,
which fields a mapping has, and their defaults.

The text syntax, the formatter and the diff read the schema through these functions, so
a field added to ``schema.py`` is parsed, printed and compared without further changes.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

Model = type[BaseModel]


def alternatives(tp: Any) -> list[Any]:
    """The forms a value of type ``tp`` may take: Annotated and unions flattened."""
    origin = get_origin(tp)
    if origin is Annotated:
        return alternatives(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [alt for arg in get_args(tp) for alt in alternatives(arg)]
    return [tp]


def models_of(tp: Any) -> list[Model]:
    return [a for a in alternatives(tp) if isinstance(a, type) and issubclass(a, BaseModel)]


def literals_of(tp: Any) -> list[Any]:
    return [v for a in alternatives(tp) if get_origin(a) is Literal for v in get_args(a)]


def list_item(tp: Any) -> Any | None:
    """The item type of ``tp``'s list form, or None when it has none."""
    for alt in alternatives(tp):
        if get_origin(alt) is list:
            return (get_args(alt) or (Any,))[0]
    return None


def dict_value(tp: Any) -> Any | None:
    """The value type of ``tp``'s free-key mapping form (``dict[str, X]``), or None."""
    for alt in alternatives(tp):
        if get_origin(alt) is dict:
            return (get_args(alt) or (Any, Any))[1]
    return None


def takes(tp: Any, kind: type) -> bool:
    """Whether ``tp`` has a scalar form of Python type ``kind`` (str, int, float, bool)."""
    for alt in alternatives(tp):
        if alt is Any:
            return True
        if isinstance(alt, type) and issubclass(alt, kind) and not issubclass(alt, BaseModel):
            return True
        if get_origin(alt) is Literal and any(type(v) is kind for v in get_args(alt)):
            return True
    return False


def fields(model: Model) -> list[tuple[str, FieldInfo]]:
    """``(key as written in specs, field)`` in declaration order."""
    return [(f.alias or name, f) for name, f in model.model_fields.items()]


def field_type(models: list[Model], key: str) -> Any | None:
    """The type of ``key`` in the first of ``models`` that has it."""
    for model in models:
        for name, f in fields(model):
            if name == key:
                return f.annotation
    return None


def kind_values(model: Model) -> tuple[Any, ...]:
    """The values of a model's ``kind`` discriminator (empty when it has none)."""
    for name, f in fields(model):
        if name == "kind":
            return tuple(literals_of(f.annotation))
    return ()


def kind_model(models: list[Model], kind: Any) -> Model | None:
    return next((m for m in models if kind in kind_values(m)), None)


def head_model(models: list[Model], key: str) -> Model | None:
    """The model among ``models`` whose first field is ``key`` and is required, so that
    ``key(value, ...)`` names it: ``copy(base, count=8)``, ``from(seed)``."""
    for model in models:
        name, f = fields(model)[0]
        if name == key and f.is_required() and not kind_values(model):
            return model
    return None


def which_model(data: dict[str, Any], models: list[Model]) -> Model | None:
    """The model that plain ``data`` is an instance of, among ``models``."""
    if not models:
        return None
    if "kind" in data:
        found = kind_model(models, data["kind"])
        if found is not None:
            return found
    best, best_score = None, -1
    for model in models:
        keys = {name for name, _ in fields(model)}
        required = {name for name, f in fields(model) if f.is_required()}
        if set(data) <= keys and required <= set(data):
            return model
        score = len(set(data) & keys)
        if score > best_score:
            best, best_score = model, score
    return best


def default_data(f: FieldInfo) -> Any:
    """A field's default as plain data (what ``Spec.to_data`` holds for it), or
    ``PydanticUndefined`` for a required field."""
    if f.is_required():
        return PydanticUndefined
    value = f.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return to_jsonable_python(value)
