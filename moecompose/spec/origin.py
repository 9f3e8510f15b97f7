"""Where a spec came from: its file, the folder its relative paths start from, the
line/column of every key and value, so later stages can point at the text, and the text's
comments, so the formatter can keep them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moecompose.errors import Location
from moecompose.spec.comments import Comment

DataPath = tuple[str | int, ...]


@dataclass
class Origin:
    file: str | None
    base_dir: Path
    values: dict[DataPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DataPath, tuple[int, int]] = field(default_factory=dict)
    comments: list[Comment] = field(default_factory=list)

    @classmethod
    def in_memory(cls, base_dir: Path | None = None) -> Origin:
        return cls(file=None, base_dir=(base_dir or Path.cwd()).resolve())

    def locate(self, path: DataPath, *, key: bool = False) -> Location:
        """The location of the value at ``path`` (or of its key), else its nearest parent."""
        table = self.keys if key else self.values
        probe = tuple(path)
        while True:
            if probe in table:
                line, column = table[probe]
                return Location(self.file, line, column)
            if probe in self.values:
                line, column = self.values[probe]
                return Location(self.file, line, column)
            if not probe:
                return Location(self.file)
            probe = probe[:-1]


def path_text(path: DataPath) -> str:
    """``('layers', 0, 'ffn', 'k')`` -> ``layers[0].ffn.k``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"
