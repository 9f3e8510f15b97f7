"""The text front end: ``.moe`` text -> the plain data YAML would give -> ``Spec``.

The grammar (``dsl.lark``) knows only lines, terms and brackets. Lowering walks the parse
tree alongside the spec's pydantic models (through :mod:`moecompose.spec.fields`) to decide
what each term means at its position — ``topk(k=2)`` is ``{kind: topk, k: 2}`` where a
router goes, ``copy(base, count=8)`` is ``{copy: base, count: 8}`` where experts go — and
records the line and column of every key and value, so that validation and every later
stage point into the ``.moe`` text. The data then goes through the same validation as YAML.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from moecompose.errors import Location, MoeComposeError, SpecError, did_you_mean, one_of
from moecompose.spec import fields as F
from moecompose.spec.comments import Comment, comment
from moecompose.spec.origin import DataPath, Origin, path_text
from moecompose.spec.schema import Spec
from moecompose.spec.validation import spec_from_data

__all__ = ["attach_snippet", "file_snippet", "parse_dsl", "snippet"]

MAX_DEPTH = 64
_PUNCTUATION = {"LSQB", "RSQB", "LBRACE", "RBRACE", "LPAR", "RPAR", "COMMA", "EQUAL", "SEMICOLON", "EVERY"}
_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}
_KEYWORDS = {"true": True, "false": False, "null": None}


class _Brackets:
    """Newlines inside ``(...)`` and ``[...]`` do not end a line."""

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        for token in stream:
            if token.type in ("LSQB", "LPAR"):
                depth += 1
            elif token.type in ("RSQB", "RPAR"):
                depth = max(0, depth - 1)
            if token.type == "_NL" and depth:
                continue
            yield token


_COMMENT_TOKENS: ContextVar[list[Token] | None] = ContextVar("dsl_comment_tokens", default=None)


def _on_comment(token: Token) -> Token:
    found = _COMMENT_TOKENS.get()
    if found is not None:
        found.append(token)
    return token


@functools.cache
def _parser() -> Lark:
    grammar = (Path(__file__).with_name("dsl.lark")).read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", postlex=_Brackets(), propagate_positions=True,
                lexer_callbacks={"COMMENT": _on_comment})


# ------------------------------------------------------------------------ snippets


def snippet(text: str, line: int | None, column: int | None) -> str | None:
    """The offending line with a caret under ``column``::

        3 | layers al { ffn x }
          |        ^
    """
    lines = text.splitlines() or [""]
    if line is None or not 1 <= line <= len(lines):
        return None
    shown = lines[line - 1].expandtabs(4)
    raw = lines[line - 1][: max(0, (column or 1) - 1)]
    caret = len(raw.expandtabs(4))
    number = str(line)
    pad = " " * len(number)
    return f" {number} | {shown}\n {pad} | {' ' * caret}^"


def attach_snippet(exc: MoeComposeError, text: str, file: str | None) -> MoeComposeError:
    """Give ``exc`` the snippet of ``text`` it points at, if it points into ``file``."""
    where = exc.location
    if exc.snippet is None and where is not None and where.file == file and where.line:
        exc.snippet = snippet(text, where.line, where.column)
    return exc


# ------------------------------------------------------------------------- parsing


def parse_dsl(text: str, file: str | None = None, base_dir: Path | None = None) -> Spec:
    """Parse ``.moe`` spec text. ``file`` names it in errors; relative paths start at
    ``base_dir``."""
    origin = Origin(file=file, base_dir=(base_dir or Path.cwd()).resolve())
    try:
        tree, origin.comments = _parse_tree(text, file)
        data = _Lowering(origin).top(tree)
        if not data:
            raise SpecError(
                "the spec is empty",
                location=Location(file, 1, 1),
                hint="write at least 'moecompose 1' and 'sources { NAME = PATH }'",
            )
        return spec_from_data(data, origin)
    except SpecError as exc:
        raise attach_snippet(exc, text, file) from None


def _parse_tree(text: str, file: str | None) -> tuple[Tree, list[Comment]]:
    """The parse tree of ``text`` and its comments."""
    _check_brackets(text, file)
    found: list[Token] = []
    collecting = _COMMENT_TOKENS.set(found)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, file) from None
    except LarkError as exc:  # anything else the parser may raise: still one located line
        raise SpecError(f"syntax error: {exc.__class__.__name__.lower()}",
                        location=Location(file)) from None
    finally:
        _COMMENT_TOKENS.reset(collecting)
    return tree, [comment(str(t), text[t.start_pos - t.column + 1:t.start_pos], t.line, t.column)
                  for t in found]


def _check_brackets(text: str, file: str | None) -> None:
    """Unbalanced brackets and unclosed quotes, reported where they were opened."""
    stack: list[tuple[str, int, int]] = []
    line, column, i, n = 1, 1, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch == '"':
            start = (line, column)
            i += 1
            column += 1
            while i < n and text[i] not in '"\n':
                step = 2 if text[i] == "\\" and i + 1 < n and text[i + 1] != "\n" else 1
                i += step
                column += step
            if i >= n or text[i] == "\n":
                raise SpecError("quoted text is never closed", location=Location(file, *start),
                                hint='add the closing \'"\' on the same line')
        elif ch in _OPENERS:
            stack.append((ch, line, column))
            if len(stack) > MAX_DEPTH:
                raise SpecError(f"brackets nested more than {MAX_DEPTH} deep",
                                location=Location(file, line, column))
        elif ch in _CLOSERS:
            if not stack:
                raise SpecError(f"'{ch}' closes nothing", location=Location(file, line, column),
                                hint=f"remove it, or add the opening '{_CLOSERS[ch]}' before it")
            opener, oline, ocolumn = stack.pop()
            if _OPENERS[opener] != ch:
                raise SpecError(
                    f"'{ch}' does not match the '{opener}' opened at line {oline}, column {ocolumn}",
                    location=Location(file, line, column),
                    hint=f"close '{opener}' with '{_OPENERS[opener]}' first",
                )
        if ch == "\n":
            line, column = line + 1, 1
        else:
            column += 1
        i += 1
    if stack:
        opener, oline, ocolumn = stack[-1]
        raise SpecError(f"'{opener}' opened here is never closed",
                        location=Location(file, oline, ocolumn),
                        hint=f"add the closing '{_OPENERS[opener]}'")


_WORDS = {
    "NAME": "a name", "STRING": "quoted text", "NUMBER": "a number", "PATH": "a path",
    "SIZE": "a size", "RANGE": "a layer range such as 0..4", "LSQB": "'['", "RSQB": "']'",
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "COMMA": "','",
    "EQUAL": "'='", "SEMICOLON": "';'", "_NL": "the end of the line", "EVERY": "'every'",
    "$END": "the end of the file",
}
_VALUE_STARTS = {"NAME", "STRING", "NUMBER", "PATH", "SIZE", "RANGE", "LSQB", "LBRACE", "LPAR"}


def _expected(names: set[str]) -> str:
    names = {n for n in names if n in _WORDS}
    words = []
    if {"NAME", "NUMBER", "PATH"} <= names:
        words.append("a value")
        names -= _VALUE_STARTS
    words += [_WORDS[n] for n in sorted(names, key=list(_WORDS).index)]
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe_token(token: Token) -> str:
    if token.type in ("_NL", "$END"):
        return _WORDS[token.type]
    if token.type == "NUMBER":
        return f"number {token}"
    if token.type == "STRING":
        return f"text {token}"
    return f"'{token}'"


def _syntax_error(exc: UnexpectedInput, text: str, file: str | None) -> SpecError:
    line, column = exc.line, exc.column
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(text) else "?"
        hint = {
            ":": "write 'key value' or 'key=value'; ':' belongs to the YAML syntax",
            "'": 'quote text with double quotes: "..."',
            "-": "a list is written [a, b, c]",
        }.get(ch)
        expected = _expected(set(exc.allowed or ()))
        message = f"unexpected character {ch!r}"
        if ch.isdigit():
            message = "a number must be followed by a space, ',' or a bracket"
            hint = hint or "quote text that starts with a digit"
        elif expected:
            message += f", expected {expected}"
        return SpecError(message, location=Location(file, line, column), hint=hint)
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END" or line is None or line < 0:
            lines = text.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
        expected = set(exc.expected or ())
        hint = None
        if expected <= {"NAME", "STRING", "_NL", "SEMICOLON", "RBRACE", "$END"}:
            what = "a key (a name)"
            hint = "each line is 'key value', e.g. 'seed 0' or 'merge average'"
            if token.type == "EQUAL":
                hint = "write the key before '=': NAME = VALUE"
        else:
            what = _expected(expected)
        if token.type == "EVERY":
            hint = "'every' follows a layer range: 0..12 every 2"
        return SpecError(f"unexpected {_describe_token(token)}, expected {what}",
                         location=Location(file, line, column), hint=hint)
    return SpecError("syntax error", location=Location(file, line, column))


# ------------------------------------------------------------------------ lowering

Term = Tree | Token


def _terms(tree: Tree) -> list[Term]:
    """A node's children without punctuation."""
    return [c for c in tree.children if not (isinstance(c, Token) and c.type in _PUNCTUATION)]


def _at(node: Term) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.line or 1, node.column or 1
    if isinstance(node, Tree) and node.meta and not node.meta.empty:
        return node.meta.line, node.meta.column
    return 1, 1


def _is(node: Term, kind: str) -> bool:
    return isinstance(node, Tree) and node.data == kind


def _name(node: Term) -> str | None:
    """The text of a bare name term (``seed``), else None."""
    if _is(node, "scalar"):
        token = node.children[0]
        if isinstance(token, Token) and token.type == "NAME":
            return str(token)
    return None


def _head_key(models: list[F.Model]) -> str | None:
    """The field a leading bare value fills: ``layers all {...}`` -> select,
    ``router topk k=2`` -> kind."""
    if models and all(F.kind_values(m) for m in models):
        return "kind"
    if len(models) == 1:
        name, f = F.fields(models[0])[0]
        if f.is_required():
            return name
    return None


def _forms(tp: Any) -> str:
    """The forms of value ``tp`` takes, in the text syntax, for error messages."""
    out = [repr(v) for v in F.literals_of(tp) if isinstance(v, str)]
    for model in F.models_of(tp):
        kinds = F.kind_values(model)
        if kinds:
            out += [f"{k}(...)" for k in kinds]
        elif F.head_model([model], F.fields(model)[0][0]) is model and len(F.models_of(tp)) > 1:
            out.append(f"{F.fields(model)[0][0]}(...)")
        else:
            out.append("(key=value, ...)")
    if F.list_item(tp) is not None:
        out.append("[...]")
    return ", ".join(out) or "a value"


class _Lowering:
    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.file = origin.file

    def error(self, message: str, node: Term | tuple[int, int], hint: str | None = None) -> SpecError:
        line, column = node if isinstance(node, tuple) else _at(node)
        return SpecError(message, location=Location(self.file, line, column), hint=hint)

    def mark(self, path: DataPath, node: Term, key: Term | None = None) -> None:
        self.origin.values[path] = _at(node)
        if key is not None:
            self.origin.keys[path] = _at(key)

    def top(self, tree: Tree) -> dict[str, Any]:
        self.origin.values[()] = (1, 1)
        return self.lines([c for c in tree.children if _is(c, "line")], Spec, ())

    # -- mappings
    def key_text(self, token: Token) -> str:
        if token.type == "STRING":
            return self.string(token)
        return str(token)

    def lines(self, lines: list[Tree], tp: Any, path: DataPath,
              into: dict[str, Any] | None = None) -> dict[str, Any]:
        """The lines of a block (or of the file) as a mapping of type ``tp``."""
        models = F.models_of(tp)
        free = F.dict_value(tp)
        out: dict[str, Any] = {} if into is None else into
        for line in lines:
            key_token = line.children[0]
            assert isinstance(key_token, Token)
            key = self.key_text(key_token)
            terms = [t for t in line.children[1:] if not (isinstance(t, Token) and t.type == "EQUAL")]
            value_tp = free if free is not None and not models else F.field_type(models, key)
            where = (*path, key)
            item = F.list_item(value_tp)
            rule_list = item is not None and bool(F.models_of(item)) and _head_key(F.models_of(item))
            whole_list = len(terms) == 1 and _is(terms[0], "list")
            if rule_list and not whole_list:
                # layers all {...}: each line adds one item
                if key not in out:
                    out[key] = []
                    self.mark(where, line, key_token)
                elif not isinstance(out[key], list):
                    raise self.error(f"duplicate key '{key}'", key_token, "each key may appear once")
                i = len(out[key])
                self.origin.values[(*where, i)] = _at(key_token)
                out[key].append(self.mapping(terms, item, (*where, i), key_token))
                continue
            if key in out:
                raise self.error(f"duplicate key '{key}'" + (f" in {path_text(path)}" if path else ""),
                                 key_token, "each key may appear once")
            self.check_key(key, key_token, models, free, path)
            self.origin.keys[where] = _at(key_token)
            out[key] = self.value(terms, value_tp, where, key_token)
        return out

    def value(self, terms: list[Term], tp: Any, path: DataPath, key: Token) -> Any:
        """The value of one line's terms."""
        if not terms:
            end = (key.end_line or key.line or 1, (key.end_column or key.column or 1))
            self.origin.values[path] = end
            raise self.error(f"expected a value after '{key}'", end, self.value_hint(tp))
        if len(terms) == 1 and not _is(terms[0], "kwarg"):
            name = _name(terms[0])
            known = {k for m in F.models_of(tp) for k, _ in F.fields(m)}
            if name in known and not F.takes(tp, str):  # ffn experts (and no value)
                raise self.error(f"expected a value after '{name}'", terms[0],
                                 self.value_hint(F.field_type(F.models_of(tp), name)))
            return self.term(terms[0], tp, path)
        return self.mapping(terms, tp, path, key)

    def value_hint(self, tp: Any) -> str | None:
        forms = _forms(tp) if tp is not None else "a value"
        return None if forms == "a value" else f"expected {forms}"

    def mapping(self, terms: list[Term], tp: Any, path: DataPath, anchor: Term) -> dict[str, Any]:
        """``head k=v k v {...}``: a mapping from a run of terms on one line."""
        models = F.models_of(tp)
        free = F.dict_value(tp)
        if not terms:
            raise self.error("expected a value", anchor)
        self.mark(path, terms[0])
        out: dict[str, Any] = {}
        known = {name for m in models for name, _ in F.fields(m)}
        i = 0
        head = _head_key(models)
        first = terms[0]
        first_name = _name(first)
        if head is not None and not _is(first, "kwarg") and not _is(first, "block") and not (
            first_name is not None and first_name in known and len(terms) > 1
        ):
            head_tp = F.field_type(models, head)
            self.origin.keys[(*path, head)] = _at(first)
            if head == "kind":
                out["kind"] = self.scalar_text(first, path)
            else:
                out[head] = self.term(first, head_tp, (*path, head))
            i = 1
        while i < len(terms):
            term = terms[i]
            if _is(term, "kwarg"):
                key_token, value = _terms(term)
                assert isinstance(key_token, Token)
                self.put(out, self.key_text(key_token), value, key_token, models, free, path)
                i += 1
            elif _is(term, "block"):
                lines = [c for c in term.children if _is(c, "line")]
                for line in lines:
                    key_token = line.children[0]
                    assert isinstance(key_token, Token)
                    if self.key_text(key_token) in out:
                        raise self.error(f"duplicate key '{key_token}'", key_token,
                                         "each key may appear once")
                self.lines(lines, tp, path, into=out)
                i += 1
            elif (key := _name(term) or self.quoted(term)) is not None and i + 1 < len(terms):
                self.put(out, key, terms[i + 1], term, models, free, path)
                i += 2
            else:
                key = _name(term) or self.quoted(term)
                if key is not None:
                    raise self.error(f"expected a value after '{key}'", term)
                hint = None
                if i == 0 and head is None and models:
                    hint = f"expected {_forms(tp)}"
                raise self.error("expected 'key value' or 'key=value' here", term, hint)
        return out

    def check_key(self, key: str, key_node: Term, models: list[F.Model], free: Any,
                  path: DataPath) -> None:
        """An unknown key is reported at the key itself, as the YAML front end does."""
        if not models or free is not None:
            return
        known = list(dict.fromkeys(name for m in models for name, _ in F.fields(m)))
        if key in known:
            return
        what = f"key '{key}' in {path_text(path)}" if path else f"top-level key '{key}'"
        raise self.error(f"unknown {what}", key_node, models[0].unknown_key_hint(key, known))

    def put(self, out: dict[str, Any], key: str, value: Term, key_node: Term,
            models: list[F.Model], free: Any, path: DataPath) -> None:
        if key in out:
            raise self.error(f"duplicate key '{key}'", key_node, "each key may appear once")
        self.check_key(key, key_node, models, free, path)
        value_tp = free if free is not None and not models else F.field_type(models, key)
        self.origin.keys[(*path, key)] = _at(key_node)
        out[key] = self.term(value, value_tp, (*path, key))

    def quoted(self, term: Term) -> str | None:
        if _is(term, "scalar"):
            token = term.children[0]
            if isinstance(token, Token) and token.type == "STRING":
                return self.string(token)
        return None

    # -- terms
    def term(self, term: Term, tp: Any, path: DataPath) -> Any:
        self.mark(path, term)
        if _is(term, "scalar"):
            return self.scalar(term, tp, path)
        if _is(term, "list"):
            item = F.list_item(tp)
            out = []
            for j, child in enumerate(_terms(term)):
                if _is(child, "kwarg"):
                    raise self.error("'key=value' inside a list", child,
                                     "write a mapping as (key=value, ...) or {key value}")
                out.append(self.term(child, item, (*path, j)))
            return out
        if _is(term, "block"):
            return self.lines([c for c in term.children if _is(c, "line")], tp, path)
        if _is(term, "call"):
            return self.call(term, tp, path)
        if _is(term, "kwarg"):
            return self.mapping([term], tp, path, term)
        if _is(term, "range"):
            return self.range(term, path)
        raise self.error("unexpected term", term)

    def scalar_text(self, term: Term, path: DataPath) -> Any:
        token = term.children[0] if isinstance(term, Tree) else term
        assert isinstance(token, Token)
        if token.type == "STRING":
            return self.string(token)
        if token.type == "NUMBER":
            return self.number(token)
        if token.type == "NAME" and str(token) in _KEYWORDS:
            return _KEYWORDS[str(token)]
        return str(token)

    def scalar(self, term: Tree, tp: Any, path: DataPath) -> Any:
        value = self.scalar_text(term, path)
        token = term.children[0]
        if isinstance(token, Token) and token.type == "NAME" and isinstance(value, str):
            models = F.models_of(tp)
            if models and value not in F.literals_of(tp) and not F.takes(tp, str) and (
                all(F.kind_values(m) for m in models)
            ):
                # router topk -> {kind: topk}
                self.origin.keys[(*path, "kind")] = _at(term)
                self.origin.values[(*path, "kind")] = _at(term)
                return {"kind": value}
        return value

    def string(self, token: Token) -> str:
        try:
            value = json.loads(str(token))
        except ValueError:
            raise self.error("invalid escape in quoted text", token,
                             'use JSON escapes: \\" \\\\ \\n \\t \\uXXXX') from None
        return str(value)

    def number(self, token: Token) -> int | float:
        text = str(token)
        try:
            if re.fullmatch(r"[+-]?\d+", text):
                return int(text)
            return float(text)
        except ValueError:
            raise self.error(f"number {text[:20]}... is too long", token) from None

    def range(self, term: Tree, path: DataPath) -> dict[str, int]:
        """``2..12 every 2`` -> ``{from: 2, to: 12, every: 2}`` (``to`` exclusive)."""
        parts = _terms(term)
        token = parts[0]
        assert isinstance(token, Token)
        start, _, end = str(token).partition("..")
        out: dict[str, int] = {}
        line, column = _at(token)
        if start:
            out["from"] = int(start)
            self.origin.keys[(*path, "from")] = self.origin.values[(*path, "from")] = (line, column)
        if end:
            out["to"] = int(end)
            at = (line, column + len(start) + 2)
            self.origin.keys[(*path, "to")] = self.origin.values[(*path, "to")] = at
        if len(parts) > 1:
            every = parts[1]
            assert isinstance(every, Token)
            value = self.number(every)
            if not isinstance(value, int):
                raise self.error(f"'every' takes a whole number, got {every}", every)
            out["every"] = value
            self.origin.keys[(*path, "every")] = self.origin.values[(*path, "every")] = _at(every)
        return out

    def call(self, term: Tree, tp: Any, path: DataPath) -> dict[str, Any]:
        """``topk(k=2)``, ``copy(base, count=8)``, ``weights(a=1, b=2)``, ``(k=v, ...)``."""
        children = term.children
        head = children[0] if isinstance(children[0], Token) and children[0].type == "NAME" else None
        args = [c for c in _terms(term) if c is not head]
        positional = [a for a in args if not _is(a, "kwarg")]
        named = [a for a in args if _is(a, "kwarg")]
        models = F.models_of(tp)
        free = F.dict_value(tp)
        out: dict[str, Any] = {}
        order: list[tuple[str, Any]] = []
        target: list[F.Model] = models
        if head is None:
            if models:
                order = [(name, f.annotation) for name, f in F.fields(models[0])] if len(models) == 1 else []
        else:
            name = str(head)
            kind_model = F.kind_model(models, name)
            head_model = F.head_model(models, name)
            if kind_model is not None or (models and all(F.kind_values(m) for m in models)):
                out["kind"] = name
                self.origin.keys[(*path, "kind")] = self.origin.values[(*path, "kind")] = _at(head)
                target = [kind_model] if kind_model is not None else models
                order = [(n, f.annotation) for n, f in F.fields(target[0]) if n != "kind"]
            elif head_model is not None:
                head_tp = F.field_type([head_model], name)
                target = [head_model]
                if F.dict_value(head_tp) is not None and not F.models_of(head_tp) and not positional:
                    # weights(a=1, b=2) -> {weights: {a: 1, b: 2}}
                    self.origin.keys[(*path, name)] = _at(head)
                    self.origin.values[(*path, name)] = _at(named[0]) if named else _at(head)
                    inner: dict[str, Any] = {}
                    for kwarg in named:
                        key_token, value = _terms(kwarg)
                        assert isinstance(key_token, Token)
                        self.put(inner, self.key_text(key_token), value, key_token, [],
                                 F.dict_value(head_tp), (*path, name))
                    return {name: inner}
                order = [(n, f.annotation) for n, f in F.fields(head_model)]
            else:
                what = f"'{name}(...)'"
                if models or free is not None:
                    hint = f"expected {_forms(tp)}"
                    hint = (did_you_mean(name, [k for m in models for k in F.kind_values(m)]
                                         + [F.fields(m)[0][0] for m in models]) or hint)
                    raise self.error(f"unknown form {what}", head, hint)
                raise self.error(f"{what} is not allowed here", head, self.value_hint(tp))
        if len(positional) > len(order):
            extra = positional[len(order)]
            names = one_of(n for n, _ in order) if order else "none"
            raise self.error("too many values without a name", extra,
                             f"write key=value; the keys here are {names}")
        for (name, field_tp), value in zip(order, positional):
            self.origin.keys[(*path, name)] = _at(value)
            out[name] = self.term(value, field_tp, (*path, name))
        for kwarg in named:
            key_token, value = _terms(kwarg)
            assert isinstance(key_token, Token)
            self.put(out, self.key_text(key_token), value, key_token, target, free, path)
        return out


def file_snippet(location: Location | None) -> str | None:
    """The snippet a located error in a ``.moe`` file points at (None for other files)."""
    if location is None or not location.file or not location.line:
        return None
    path = Path(location.file)
    if path.suffix.lower() != ".moe":
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return snippet(text, location.line, location.column)
