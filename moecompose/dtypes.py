"""Tensor dtypes: the names specs, plans and configs use (``float32``, ``bfloat16``, ...),
the codes safetensors headers use (``F32``, ``BF16``, ...), and their sizes. One table, no
torch import: the front end (validate, plan) reads headers without torch. ``numpy_dtype``
gives the NumPy dtype a build computes in (bfloat16 from ``ml_dtypes``), ``torch_dtype``
the torch dtype where a model runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# safetensors code -> (name, bytes per element); names are torch's attribute names
_TABLE = {
    "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F64": ("float64", 8), "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2),
    "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip

ITEMSIZE: dict[str, int] = {code: size for code, (_, size) in _TABLE.items()}
"""Bytes per element, by safetensors code."""
NAMES: dict[str, str] = {code: name for code, (name, _) in _TABLE.items()}
"""Dtype name, by safetensors code."""
CODES: dict[str, str] = {name: code for code, name in NAMES.items()}
"""Safetensors code, by dtype name."""
MODEL_DTYPES = ("float32", "bfloat16", "float16")
"""What sources may hold and artifacts are built in."""


def nbytes(name: str) -> int:
    """Bytes per element of the dtype called ``name`` (``float32`` -> 4)."""
    return ITEMSIZE[CODES[name]]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` or coded ``name`` (``bfloat16`` or ``BF16``)."""
    import torch

    return getattr(torch, NAMES.get(name, name))


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype called ``name`` or coded ``name`` (``bfloat16`` or ``BF16``)."""
    import numpy as np

    name = NAMES.get(name, name)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
