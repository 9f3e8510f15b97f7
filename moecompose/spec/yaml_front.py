"""The YAML front end: text -> ``Spec``, remembering the line and column of every node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moecompose.errors import Location, SpecError
from moecompose.spec.comments import yaml_comments
from moecompose.spec.origin import DataPath, Origin
from moecompose.spec.schema import Spec
from moecompose.spec.validation import spec_from_data

# Opening constructs PyYAML names in "while parsing ..." contexts -> what the user typed.
_UNCLOSED = {
    "flow sequence": ("'['", "add the closing ']'"),
    "flow mapping": ("'{'", "add the closing '}'"),
    "quoted scalar": ("quoted text", "add the closing quote"),
}


MAX_DEPTH = 32  # a spec needs about 6 levels of nesting
MAX_NODES = 100_000  # values after aliases are expanded; specs have hundreds


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: nesting deeper than ``MAX_DEPTH`` is refused while
    composing (PyYAML's composer recurses), and the first alias is remembered so that
    an expansion beyond ``MAX_NODES`` can be reported where it starts."""

    def __init__(self, text: str, file: str | None) -> None:
        super().__init__(text)
        self.file = file
        self.depth = 0
        self.first_alias: yaml.Mark | None = None

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.first_alias = self.first_alias or event.start_mark
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SpecError(
                f"the spec is nested more than {MAX_DEPTH} levels deep",
                location=Location(self.file, event.start_mark.line + 1, event.start_mark.column + 1),
                hint="a spec needs only a few levels; check the brackets",
            )
        try:
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self.depth -= 1


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is written out (linear time:
    a node shared through aliases is counted once per use but measured once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 0  # a node that contains itself is refused by _to_data
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(v, sizes) for _, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(v, sizes) for v in node.value)
    sizes[id(node)] = size = min(size, MAX_NODES + 1)
    return size


def parse_yaml(text: str, file: str | None = None, base_dir: Path | None = None) -> Spec:
    """Parse YAML spec text. ``file`` names it in errors; relative paths start at ``base_dir``."""
    data, origin = read_yaml(text, file, base_dir,
                             empty_hint="write at least 'moecompose: 1' and 'sources: {NAME: PATH}'")
    origin.comments = yaml_comments(text)
    return spec_from_data(data, origin)


def read_yaml(text: str, file: str | None, base_dir: Path | None, *, what: str = "spec",
              empty_hint: str | None = None) -> tuple[Any, Origin]:
    """YAML text -> plain data, and the ``Origin`` holding every key's and value's line and
    column; bounded (``MAX_DEPTH``, ``MAX_NODES``), and every syntax error located. ``what``
    names the document in messages (a spec, a training recipe)."""
    origin = Origin(file=file, base_dir=(base_dir or Path.cwd()).resolve())
    try:
        loader = _SpecLoader(text, file)  # checks every character up front
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML syntax: {_one_line(str(exc))}", location=Location(file)) from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise SpecError(f"the {what} is empty", location=Location(file, 1, 1), hint=empty_hint)
        if loader.first_alias is not None and _expanded_size(root, {}) > MAX_NODES:
            mark = loader.first_alias
            raise SpecError(
                f"YAML aliases expand to more than {MAX_NODES:,} values",
                location=Location(file, mark.line + 1, mark.column + 1),
                hint="write the repeated parts out, or use fewer nested aliases",
            )
        data = _to_data(loader, root, (), origin, set())
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, file) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, file) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML syntax: {_one_line(str(exc))}", location=Location(file)) from None
    finally:
        loader.dispose()
    return data, origin


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reader_error(exc: yaml.reader.ReaderError, text: str, file: str | None) -> SpecError:
    line, column = _line_column(text, exc.position)
    character = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return SpecError(
        f"YAML syntax: character {character!r} is not allowed in YAML text",
        location=Location(file, line, column),
        hint="remove it; write special characters as escapes inside double quotes",
    )


def _line_column(text: str, position: int) -> tuple[int, int]:
    before = text[:position]
    line = before.count("\n") + 1
    return line, position - (before.rfind("\n") + 1) + 1


def _syntax_error(exc: yaml.MarkedYAMLError, file: str | None) -> SpecError:
    problem = exc.problem or ""
    context = exc.context or ""
    mark = exc.problem_mark or exc.context_mark
    hint: str | None = "check the indentation, colons and brackets around here"
    if ("end of stream" in problem or "<stream end>" in problem) and exc.context_mark:
        for construct, (what, fix) in _UNCLOSED.items():
            if construct in context:
                mark = exc.context_mark
                return SpecError(
                    f"YAML syntax: {what} opened here is never closed",
                    location=Location(file, mark.line + 1, mark.column + 1),
                    hint=fix,
                )
    if "'\\t'" in problem or "\t" in problem:
        problem = "a tab character cannot start a token"
        hint = "indent with spaces; YAML does not allow tabs for indentation"
    elif problem.startswith("expected <block end>"):
        problem = "this line's indentation does not match the lines above"
        hint = "indent keys of one mapping by the same number of spaces"
    elif "mapping values are not allowed here" in problem:
        hint = "put a space after ':' and quote values that contain ': '"
    elif "found another document" in problem:
        problem = "a spec file holds one YAML document, found a second one"
        hint = "remove the '---' separator and what follows it, or split the file"
    if not problem:
        problem = context or "invalid YAML"
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return SpecError(f"YAML syntax: {_one_line(problem)}", location=Location(file, line, column), hint=hint)


def _to_data(
    loader: yaml.SafeLoader, node: yaml.Node, path: DataPath, origin: Origin, active: set[int]
) -> Any:
    origin.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in active:
            raise SpecError(
                "YAML alias refers to a node that contains it",
                location=Location(origin.file, node.start_mark.line + 1, node.start_mark.column + 1),
                hint="a spec cannot be recursive",
            )
        active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            where = Location(origin.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SpecError(
                    "YAML merge keys ('<<') are not supported in specs",
                    location=where,
                    hint="write the keys out",
                )
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError("keys must be names, not lists or mappings", location=where)
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise SpecError(f"keys must be names, got {key!r}", location=where)
            if key in out:
                raise SpecError(
                    f"duplicate key '{key}'", location=where, hint="each key may appear once"
                )
            origin.keys[(*path, key)] = (where.line, where.column)
            out[key] = _to_data(loader, value_node, (*path, key), origin, active)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_data(loader, item, (*path, i), origin, active) for i, item in enumerate(node.value)
        ]
    try:
        return loader.construct_object(node, deep=True)
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise SpecError(
            f"cannot read the value {node.value[:20]!r}{'...' if len(node.value) > 20 else ''}: "
            f"{_one_line(str(exc)).split(';')[0]}",
            location=Location(origin.file, node.start_mark.line + 1, node.start_mark.column + 1),
            hint="write a number of normal size",
        ) from None
