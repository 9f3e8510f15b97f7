"""Reading files that users name: what a path really is, and JSON with bounds.

Every file a user points at (a spec, a config.json, a safetensors shard, a stored vector)
may be a directory, a FIFO that would block ``open`` forever, a symlink loop, or a
crafted document nested deeply enough to exhaust the interpreter's stack. These helpers
answer such cases with a sentence for a located error instead of a hang or a traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 64
MAX_JSON_INT_DIGITS = 40
MAX_JSON_BYTES = 64 * 1024 * 1024

_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file that can be opened, or None when it is one.

    Follows symlinks (Hugging Face caches link shards to blobs) but never opens the path,
    so a FIFO or a device is reported instead of blocking.
    """
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # a NUL character: no file system can hold such a name
        return "is not a valid path (it contains a NUL character)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if exc.errno == errno.ENOENT:
            return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
        if exc.errno == errno.EACCES:
            return "cannot be read (permission denied)"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file"


def _json_depth(raw: bytes) -> int:
    depth = deepest = 0
    for match in _STRUCTURE.finditer(raw):
        char = match.group()[:1]
        if char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise ValueError(f"a number with {digits} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _parse_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number JSON allows")


def loads_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text, refusing what no model file needs and what could hurt the reader:
    nesting deeper than ``max_depth``, integers of more than 40 digits, and non-finite
    numbers (``NaN``, ``Infinity``, ``1e999``). Every refusal is a ``ValueError`` whose
    text says what was found (``json.JSONDecodeError`` is one too)."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if _json_depth(data) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    text = data.decode("utf-8")
    return json.loads(
        text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
    )


def read_json_file(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``loads_json`` of a file, after checking it is a regular file of at most
    ``max_bytes``. Raises ``OSError`` for what cannot be read and ``ValueError`` (with a
    sentence) for what is not acceptable JSON; ``UnicodeDecodeError`` is a ``ValueError``."""
    problem = file_problem(path)
    if problem is not None:
        raise FileKindError(problem)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"is {size:,} bytes, more than the {max_bytes:,} a JSON file may have")
    return loads_json(Path(path).read_bytes())


class FileKindError(ValueError):
    """A path that is not a regular file; the message says what it is."""
