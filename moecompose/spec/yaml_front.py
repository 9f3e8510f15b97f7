"""The YAML front end: text -> ``Spec``, remembering the line and column of every node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moecompose.errors import Location, SpecError
from moecompose.spec.origin import DataPath, Origin
from moecompose.spec.schema import Spec
from moecompose.spec.validation import spec_from_data


def parse_yaml(text: str, file: str | None = None, base_dir: Path | None = None) -> Spec:
    """Parse YAML spec text. ``file`` names it in errors; relative paths start at ``base_dir``."""
    origin = Origin(file=file, base_dir=(base_dir or Path.cwd()).resolve())
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = {} if root is None else _to_data(loader, root, (), origin)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(f"YAML syntax: {problem}", location=Location(file, line, column)) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML syntax: {exc}", location=Location(file)) from None
    finally:
        loader.dispose()
    return spec_from_data(data, origin)


def _to_data(loader: yaml.SafeLoader, node: yaml.Node, path: DataPath, origin: Origin) -> Any:
    origin.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            where = Location(origin.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise SpecError(f"keys must be names, got {key!r}", location=where)
            if key in out:
                raise SpecError(
                    f"duplicate key '{key}'", location=where, hint="each key may appear once"
                )
            origin.keys[(*path, key)] = (where.line, where.column)
            out[key] = _to_data(loader, value_node, (*path, key), origin)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(loader, item, (*path, i), origin) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
