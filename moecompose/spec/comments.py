"""Comments in spec text: found in either syntax, attached to data paths, written back.

``#`` starts a comment in both syntaxes, so a comment moves between them unchanged. Where
a comment goes in canonical text (docs/spec.md, "Formatting and comments"):

* A *data line* is a line on which a key or a list item starts; its path is the outermost
  one starting there (leftmost, then shortest).
* A full-line comment belongs before the next data line; a trailing comment after the
  data line it ends (after the one before it, if its own line starts no data: ``}``).
* Full-line comments before the first data line stay at the top; those after the last
  one stay at the end.
* A comment whose path canonical form leaves out (a default) goes before the next key of
  the same mapping, in file order, that stays; failing that, to the parent (same side);
  failing that, to the end of the file.
* What canonical form writes on one line (``{a: 1, b: 2}``, ``ffn experts=... k=...``) is
  written one entry per line when a comment belongs inside it and the syntax has such a
  form, so the comment stays next to its key.
* Trailing comments are set off by two spaces; several that meet on one line are joined
  in file order. Full-line comments take the indentation of the line they precede.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    from moecompose.spec.origin import DataPath, Origin

__all__ = ["Attached", "Comment", "attach", "comment", "data_paths", "holders", "weave",
           "yaml_comments", "yaml_scalar_lines"]

_BREAK = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")
# Characters that YAML text may hold inside a comment (printable, no line breaks).
_NOT_IN_COMMENT = re.compile("[^\t\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

Where = Literal["top", "before", "after", "end"]


@dataclass(frozen=True)
class Comment:
    """One ``# ...`` comment: its text from ``#`` on, where it starts (1-based line and
    column), and whether code precedes it on its line."""

    text: str
    line: int
    column: int
    trailing: bool


@dataclass(frozen=True)
class Attached:
    """A comment and where it goes: at the ``top`` or ``end`` of the file, or ``before``
    or ``after`` the line on which ``path`` starts."""

    comment: Comment
    where: Where
    path: DataPath = ()


def comment(body: str, before: str, line: int, column: int) -> Comment:
    """The comment ``body`` (``#`` to the end of its line), with ``before`` the text that
    precedes it on its line."""
    text = _NOT_IN_COMMENT.sub("\ufffd", body.rstrip())
    return Comment(text, line, column, trailing=bool(before.strip(" \t\ufeff")))


# ----------------------------------------------------------------------------- finding


def yaml_comments(text: str) -> list[Comment]:
    """The comments of YAML ``text`` (text the YAML loader accepted): each ``#`` that lies
    between the scanner's tokens starts one, so a ``#`` inside a scalar never does."""
    starts = [0] + [m.end() for m in _BREAK.finditer(text)]
    found: list[Comment] = []
    done = 0
    for start, end in [*sorted(_yaml_token_spans(text)), (len(text), len(text))]:
        hash_at = text.find("#", done, start)
        while hash_at >= 0:
            line = bisect.bisect_right(starts, hash_at)
            line_end = _BREAK.search(text, hash_at)
            stop = line_end.start() if line_end else len(text)
            found.append(comment(text[hash_at:stop], text[starts[line - 1]:hash_at],
                                 line, hash_at - starts[line - 1] + 1))
            hash_at = text.find("#", stop, start)
        done = max(done, end)
    return found


def _yaml_token_spans(text: str) -> Iterator[tuple[int, int]]:
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        start, end = token.start_mark.index, token.end_mark.index
        if isinstance(token, yaml.ScalarToken) and token.style in ("|", ">"):
            # a block scalar's header line may end in a comment: `key: |  # note`
            header = _BREAK.search(text, start)
            header_end = header.end() if header else len(text)
            hash_at = text.find("#", start, header_end)
            yield start, hash_at if hash_at >= 0 else header_end
            yield header_end, max(header_end, end)
        else:
            yield start, end


def yaml_scalar_lines(text: str) -> list[tuple[int, int]]:
    """The first and last line (1-based) of each scalar in YAML ``text`` that spans lines:
    no comment may go where such a scalar continues."""
    out = []
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.ScalarToken) and token.end_mark.line > token.start_mark.line:
            out.append((token.start_mark.line + 1, token.end_mark.line + 1))
    return out


# --------------------------------------------------------------------------- attaching


def _position(origin: Origin, path: DataPath) -> tuple[int, int] | None:
    """Where ``path`` starts: its key if it has one, else its value."""
    return origin.keys.get(path) or origin.values.get(path)


def _data_lines(origin: Origin) -> dict[int, DataPath]:
    """Each data line -> the outermost path that starts on it."""
    best: dict[int, tuple[int, int, str, DataPath]] = {}
    for path in {*origin.keys, *origin.values}:
        at = _position(origin, path)
        if not path or at is None:
            continue
        line, column = at
        rank = (column, len(path), repr(path), path)
        if line not in best or rank[:3] < best[line][:3]:
            best[line] = rank
    return {line: rank[3] for line, rank in best.items()}


def data_paths(data: Any, path: DataPath = ()) -> set[DataPath]:
    """Every path into plain ``data`` except the root: mapping keys and list indices."""
    out: set[DataPath] = set()
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return out
    for key, value in items:
        out.add((*path, key))
        out |= data_paths(value, (*path, key))
    return out


def attach(origin: Origin, kept: Collection[DataPath]) -> list[Attached]:
    """Each comment of ``origin`` attached to a path of ``kept`` (the canonical data's
    paths, see :func:`data_paths`), or to the top or end of the file."""
    lines = _data_lines(origin)
    numbers = sorted(lines)
    out = []
    for found in origin.comments:
        i = bisect.bisect_left(numbers, found.line)
        own = i < len(numbers) and numbers[i] == found.line
        if found.trailing and (own or i > 0):
            out.append(_settle(origin, kept, found, "after", lines[numbers[i if own else i - 1]]))
        elif i == 0:
            out.append(Attached(found, "top"))
        elif i == len(numbers):
            out.append(Attached(found, "end"))
        else:
            out.append(_settle(origin, kept, found, "before", lines[numbers[i]]))
    return out


def _settle(origin: Origin, kept: Collection[DataPath], found: Comment, where: Where,
            path: DataPath) -> Attached:
    """Move a comment off a path that canonical form leaves out."""
    while path not in kept:
        following = _next_kept_sibling(origin, kept, path)
        if following is not None:
            return Attached(found, "before", following)
        path = path[:-1]
        if not path:
            return Attached(found, "end")
    return Attached(found, where, path)


def _next_kept_sibling(origin: Origin, kept: Collection[DataPath], path: DataPath) -> DataPath | None:
    here = _position(origin, path)
    if here is None:
        return None
    best: tuple[tuple[int, int], DataPath] | None = None
    for other in kept:
        if len(other) != len(path) or other[:-1] != path[:-1]:
            continue
        at = _position(origin, other)
        if at is not None and at > here and (best is None or at < best[0]):
            best = (at, other)
    return None if best is None else best[1]


def holders(attached: Sequence[Attached]) -> frozenset[DataPath]:
    """The paths (root excluded) that hold an attached comment's path strictly inside:
    the collections to write one entry per line."""
    return frozenset(a.path[:i] for a in attached for i in range(1, len(a.path)))


# ----------------------------------------------------------------------------- writing


def weave(text: str, attached: Sequence[Attached], origin: Origin,
          scalar_lines: Sequence[tuple[int, int]] = ()) -> str:
    """``text`` with the ``attached`` comments written in. ``origin`` is ``text`` parsed
    back (where each path starts); ``scalar_lines`` are scalars spanning lines, inside which
    no comment may go."""
    rows = text.splitlines()
    top: list[str] = []
    end: list[str] = []
    before: dict[int, list[str]] = defaultdict(list)
    after: dict[int, list[str]] = defaultdict(list)
    for a in sorted(attached, key=lambda a: (a.comment.line, a.comment.column)):
        if a.where == "top":
            top.append(a.comment.text)
        elif a.where == "end":
            end.append(a.comment.text)
        elif a.where == "before":
            before[_line_above(_start_line(origin, a.path), scalar_lines)].append(a.comment.text)
        else:
            after[_line_below(_start_line(origin, a.path), scalar_lines)].append(a.comment.text)
    out = list(top)
    for number, row in enumerate(rows, 1):
        pad = row[: len(row) - len(row.lstrip(" "))]
        out += [pad + c for c in before[number]]
        out.append(row + ("  " + " ".join(after[number]) if after[number] else ""))
    return "\n".join(out + end) + "\n"


def _start_line(origin: Origin, path: DataPath) -> int:
    probe = path
    while (at := _position(origin, probe)) is None and probe:
        probe = probe[:-1]
    return at[0] if at else 1


def _line_above(line: int, scalar_lines: Sequence[tuple[int, int]]) -> int:
    """``line``, or the first line of a scalar that continues onto it."""
    moved = True
    while moved:
        moved = False
        for first, last in scalar_lines:
            if first < line <= last:
                line, moved = first, True
    return line


def _line_below(line: int, scalar_lines: Sequence[tuple[int, int]]) -> int:
    """``line``, or the last line of a scalar that continues past its end."""
    moved = True
    while moved:
        moved = False
        for first, last in scalar_lines:
            if first <= line < last:
                line, moved = last, True
    return line
