"""Safetensors without loading: parse headers, read one tensor (or a row range) with
``pread``, and write files whose header is known before any data is.

Reading through ``pread`` instead of ``mmap`` keeps source pages out of the process's
resident set, so a build's peak RSS is what it computes, not what it reads.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from moecompose.dtypes import ITEMSIZE, numpy_dtype
from moecompose.errors import SourceError
from moecompose.files import file_problem, loads_json

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_HEADER = 100 * 1024 * 1024
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    file: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    start: int
    end: int
    name: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupted(path: str, what: str) -> SourceError:
    return SourceError(
        f"corrupted safetensors header in {path}: {what}",
        hint="the file is corrupted; re-download or re-save the checkpoint",
    )


def _dims(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, list) or len(value) > 8:
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        return None
    return tuple(value)


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries and ``__metadata__`` of a safetensors file, validated against its size:
    every entry well typed, its byte range inside the file and of its shape's size, and no
    two entries sharing bytes."""
    path = str(path)
    problem = file_problem(path)
    if problem is not None:
        raise SourceError(f"{path} {problem}", hint="point to a safetensors weights file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SourceError(
                    f"{path} is not a safetensors file (shorter than 8 bytes)",
                    hint="the file is corrupted; re-download or re-save the checkpoint",
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise SourceError(
                    f"corrupted safetensors header in {path}: header length {n}, file {size} bytes",
                    hint="re-download or re-save the checkpoint",
                )
            raw = fh.read(n)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = loads_json(raw)
    except ValueError as exc:
        what = "not JSON" if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)) else str(exc)
        raise _corrupted(path, what) from None
    if not isinstance(header, dict):
        raise _corrupted(path, "not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        shape = _dims(info.get("shape")) if isinstance(info, dict) else None
        offsets = _dims(info.get("data_offsets")) if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if shape is None or offsets is None or len(offsets) != 2 or not isinstance(dtype, str):
            raise _corrupted(path, f"entry '{name}'")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if dtype not in ITEMSIZE or end < begin or end - begin != numel * ITEMSIZE[dtype] or base + end > size:
            raise SourceError(
                f"tensor '{name}' in {path} is truncated or has inconsistent offsets",
                hint="the file is corrupted; re-download or re-save the checkpoint",
            )
        entries[name] = TensorEntry(path, dtype, shape, base + begin, base + end, name)
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise _corrupted(path, f"tensors '{name_a}' and '{name_b}' share bytes")
    return entries, metadata


def pread_exact(fd: int, view: memoryview, offset: int, file: str) -> None:
    """Fill ``view`` with the bytes of open file ``fd`` from ``offset`` on (``pread``: the
    file's pages do not stay in this process's resident set)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise SourceError(f"unexpected end of file reading {file}",
                              hint="the file is truncated; re-download or rebuild it")
        got += n


_FINITE_BLOCK = 1 << 18  # elements checked at a time: their temporary stays in cache


def all_finite(array: np.ndarray) -> bool:
    """Whether a floating-point array holds no NaN or Inf. A value is not finite when all
    its exponent bits are set, so the check runs on the raw bits in blocks, one pass and
    one cache-sized temporary: bfloat16 has no fast NumPy reductions of its own."""
    import numpy as np

    width = array.dtype.itemsize * 8
    if width not in (16, 32, 64):
        raise TypeError(f"no finite check for {array.dtype}")
    exponent_bits = {16: 5 if array.dtype == np.float16 else 8, 32: 8, 64: 11}[width]
    uint = np.dtype(f"uint{width}")
    magnitude = uint.type((1 << (width - 1)) - 1)  # every bit but the sign
    first_not_finite = ((1 << exponent_bits) - 1) << (width - 1 - exponent_bits)
    bits = array.reshape(-1).view(uint)
    block = np.empty(min(_FINITE_BLOCK, bits.size), uint)
    for start in range(0, bits.size, _FINITE_BLOCK):
        part = bits[start:start + _FINITE_BLOCK]
        masked = np.bitwise_and(part, magnitude, out=block[: part.size])
        if int(masked.max()) >= first_not_finite:
            return False
    return True


def read_array(entry: TensorEntry, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor (or rows ``[a, b)`` of its first dimension) as a fresh, writable NumPy
    array (bfloat16 from ``ml_dtypes``). NumPy, not torch: a build that runs no model
    never imports torch.

    Floating-point values are checked to be finite on the way (one pass over bytes just
    read): a NaN or Inf in a source would otherwise be built into every model made from it.
    """
    import numpy as np

    shape = list(entry.shape)
    start, end = entry.start, entry.end
    if rows is not None:
        a, b = rows
        row_bytes = (end - start) // max(shape[0], 1)
        start, end = start + a * row_bytes, start + b * row_bytes
        shape[0] = b - a
    buf = bytearray(end - start)
    with open(entry.file, "rb", buffering=0) as fh:
        pread_exact(fh.fileno(), memoryview(buf), start, entry.file)
    array = np.frombuffer(buf, dtype=numpy_dtype(entry.dtype)).reshape(shape)
    if entry.dtype in FLOAT_CODES and array.size and not all_finite(array):
        bad = int((~np.isfinite(array.astype(np.float64))).sum())
        raise SourceError(
            f"tensor '{entry.name}' in {entry.file} has {bad:,} non-finite value(s) (NaN or Inf)",
            hint="the checkpoint is corrupted or diverged; use a healthy one",
        )
    return array


def read_tensor(entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """`read_array` as a torch tensor (sharing its memory), for code that runs models."""
    import torch

    array = read_array(entry, rows)
    if entry.dtype == "BF16":
        return torch.from_numpy(array.view("uint16")).view(torch.bfloat16)
    return torch.from_numpy(array)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy of contiguous data.

    The view reads the tensor's storage in place (no NumPy needed); the returned object
    keeps the tensor alive for as long as the view is used.
    """
    flat = tensor.contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_ubyte * nbytes).from_address(flat.data_ptr())
    buffer._owner = flat  # type: ignore[attr-defined]  # the storage outlives the view
    return memoryview(buffer).cast("B")


def array_bytes(array: np.ndarray) -> memoryview:
    """The raw little-endian bytes of a NumPy array (a copy only if not contiguous)."""
    import numpy as np

    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


class SafetensorsWriter:
    """Writes one safetensors file whose tensor list is known up front.

    The header (names, dtypes, shapes, offsets) is written first; then each tensor's bytes
    are appended in header order, possibly in several chunks. Nothing is held in memory
    beyond the chunk being written. A running sha256 of the file is kept.
    """

    def __init__(
        self,
        path: Path,
        tensors: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in tensors:
            nbytes = ITEMSIZE[dtype]
            for s in shape:
                nbytes *= s
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha256 = hashlib.sha256()
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._index = 0
        self._left = self._order[0][1] if self._order else 0

    def _emit(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self.sha256.update(data)

    def write(self, name: str, chunk: np.ndarray | torch.Tensor) -> None:
        """Append (part of) the bytes of tensor ``name``, which must be the current one."""
        expected, _ = self._order[self._index]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected}, got {name}")
        data = array_bytes(chunk) if hasattr(chunk, "__array_interface__") else tensor_bytes(chunk)
        if len(data) > self._left:
            raise RuntimeError(f"too many bytes for tensor {name}")
        self._emit(data)
        self._left -= len(data)
        while self._left == 0 and self._index < len(self._order) - 1:
            self._index += 1
            self._left = self._order[self._index][1]

    def close(self) -> str:
        """Finish the file; returns its sha256 hex digest."""
        if self._left != 0 or self._index != max(len(self._order) - 1, 0):
            self._fh.close()
            raise RuntimeError(f"{self.path}: tensors missing data")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self.sha256.hexdigest()

    def abort(self) -> None:
        self._fh.close()
