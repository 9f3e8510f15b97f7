"""User-facing errors: one line that says where the problem is and what to do about it.

Every mistake a user can make (in a spec, a path, a checkpoint) is raised as a
:class:`MoeComposeError`. The CLI prints :meth:`MoeComposeError.format` and exits with
status 2; nothing else is shown, so the message must stand on its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where a problem is: a file, and when known a 1-based line and column."""

    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.file or "<spec>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


class MoeComposeError(Exception):
    """A user error. ``format()`` gives the one-line message the CLI prints."""

    kind = "error"
    exit_code = 2  # the CLI's exit status: a mistake in the input

    def __init__(self, message: str, *, location: Location | None = None,
                 hint: str | None = None, snippet: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.hint = hint
        self.snippet = snippet

    def format(self) -> str:
        text = self.message
        if self.location is not None:
            text = f"{self.location}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.splitlines())

    def __str__(self) -> str:
        return self.format()


class SpecError(MoeComposeError):
    """The spec text or its meaning is wrong."""


class SourceError(MoeComposeError):
    """A source checkpoint is missing, unreadable, or incompatible with the others."""


class BuildError(MoeComposeError):
    """The build could not be carried out (output exists, corrupted tensor data)."""


class DataError(MoeComposeError):
    """Training or evaluation data (or a training recipe) is missing, unreadable or
    unusable: named by file, line, or glob."""


class ResourceError(BuildError):
    """The machine could not do what was asked (a full disk, no memory, no permission):
    not a mistake in the input, so the CLI exits with status 1, still with one line."""

    exit_code = 1


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest valid choice, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def one_of(choices: Iterable[str]) -> str:
    return ", ".join(f"'{c}'" for c in choices)
