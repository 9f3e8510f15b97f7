"""Files beside the checkpoints: domain documents and stored embedding vectors.

Only headers are read to learn a vector's width, so the resolve stage can check widths
before any build. Vectors are ``.safetensors`` (one tensor, or the one named by ``key``;
shape ``[m]`` or ``[1, m]``) or ``.npy`` (little-endian float16/32/64, C order).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from moecompose.dtypes import nbytes, torch_dtype
from moecompose.files import file_problem, loads_json

if TYPE_CHECKING:
    import torch

NPY_DTYPES = {"<f2": "float16", "<f4": "float32", "<f8": "float64"}


class VectorFileError(ValueError):
    """A document or vector file that cannot be used; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def documents(pattern: Path) -> list[Path]:
    """The files a glob matches (``**`` recurses), sorted by path; folders are skipped."""
    matches = glob.glob(str(pattern), recursive=True)
    return sorted(Path(m).resolve() for m in matches if Path(m).is_file())


def files_fingerprint(files: tuple[Path, ...] | list[Path]) -> str:
    """sha256 over each file's name and the sha256 of its content, in order."""
    digest = hashlib.sha256()
    for path in files:
        try:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise VectorFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        digest.update(f"{path.name}:{content}\n".encode())
    return digest.hexdigest()


def _safetensors_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise VectorFileError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise VectorFileError(f"{path} is not a safetensors file (bad header length)")
            header = loads_json(fh.read(n))
    except (OSError, ValueError) as exc:
        raise VectorFileError(f"{path} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict) or not all(
        isinstance(v, dict) for k, v in header.items() if k != "__metadata__"
    ):
        raise VectorFileError(f"{path} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    return header, 8 + n


def _safetensors_entry(path: Path, key: str | None) -> tuple[str, list[int]]:
    header, _ = _safetensors_header(path)
    if key is None:
        if len(header) != 1:
            names = ", ".join(sorted(header)[:8])
            raise VectorFileError(
                f"{path} holds {len(header)} tensors ({names})",
                hint="name the one to use with 'key'",
            )
        key = next(iter(header))
    if key not in header:
        raise VectorFileError(f"{path} has no tensor '{key}'",
                              hint=f"tensors: {', '.join(sorted(header)[:8])}")
    return key, _shape(path, header[key].get("shape", []))


def _npy_header(path: Path) -> tuple[str, list[int], int]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
            if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
                raise VectorFileError(f"{path} is not a .npy file")
            major = magic[6]
            size_bytes = 2 if major == 1 else 4
            (n,) = struct.unpack("<H" if major == 1 else "<I", fh.read(size_bytes))
            if n > 1 << 20:
                raise VectorFileError(f"{path} is not a .npy file (header of {n:,} bytes)")
            header = ast.literal_eval(fh.read(n).decode("latin1"))
            offset = 8 + size_bytes + n
    except (OSError, ValueError, SyntaxError, struct.error, RecursionError, MemoryError) as exc:
        raise VectorFileError(f"{path} is not a readable .npy file: {exc}") from None
    descr = header.get("descr") if isinstance(header, dict) else None
    if descr not in NPY_DTYPES:
        raise VectorFileError(f"{path} has dtype {descr!r}",
                              hint="store the vector as little-endian float16, float32 or float64")
    if header.get("fortran_order"):
        raise VectorFileError(f"{path} is in Fortran order", hint="save it in C order")
    return NPY_DTYPES[descr], _shape(path, list(header.get("shape", ()))), offset


def _shape(path: Path, shape: object) -> list[int]:
    """A header's shape: a short list of whole numbers >= 0, or a located error."""
    if not isinstance(shape, (list, tuple)) or len(shape) > 8 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise VectorFileError(f"{path} has an invalid shape {shape!r} in its header",
                              hint="the file is corrupted; save the vector again")
    return list(shape)


def _width(path: Path, shape: list[int]) -> int:
    if (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) and shape[-1] > 0:
        return shape[-1]
    raise VectorFileError(f"{path} holds a tensor of shape {shape}, not one vector",
                          hint="store one embedding of shape [m] or [1, m]")


def embedding_width(path: Path, key: str | None = None) -> int:
    """The width ``m`` of a stored vector, from the file's header only."""
    problem = file_problem(path)
    if problem is not None:
        raise VectorFileError(f"{path} {problem}", hint="check the path")
    if path.suffix == ".npy":
        if key is not None:
            raise VectorFileError(f"{path}: 'key' applies to safetensors files only")
        return _width(path, _npy_header(path)[1])
    if path.suffix == ".safetensors":
        return _width(path, _safetensors_entry(path, key)[1])
    raise VectorFileError(f"{path}: unknown vector file type '{path.suffix}'",
                          hint="use .safetensors or .npy")


def read_embedding(path: Path, key: str | None = None) -> torch.Tensor:
    """The stored vector, [m] float32."""
    import torch  # reading values needs torch; the header functions above do not

    embedding_width(path, key)  # validates the header and shape
    if path.suffix == ".npy":
        dtype, shape, offset = _npy_header(path)
        data = path.read_bytes()[offset:]
        count = 1
        for s in shape:
            count *= s
        itemsize = nbytes(dtype)
        if len(data) < count * itemsize:
            raise VectorFileError(f"{path} is truncated")
        values = torch.frombuffer(bytearray(data[: count * itemsize]), dtype=torch_dtype(dtype))
        return values.to(torch.float32).reshape(-1)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name, _ = _safetensors_entry(path, key)
    try:
        tensor = load_file(str(path))[name]
    except (SafetensorError, OSError) as exc:
        raise VectorFileError(f"{path} is corrupt: {exc}") from None
    if not tensor.is_floating_point():
        raise VectorFileError(f"{path}: tensor '{name}' is {tensor.dtype}, not floating point")
    return tensor.to(torch.float32).reshape(-1)
