"""Recipe execution: turn one planned tensor into its bytes, a chunk at a time.

Elementwise recipes (copy, mean, weighted) work on row ranges of their inputs, so even
the embedding matrix never sits in memory whole; expert parts of a ``stack`` are
produced one expert at a time, and a ``slice`` of a copied tensor (a fine-grained expert's
shard) a chunk of rows at a time. Arithmetic is float32; the result is cast to the output
dtype (round to nearest even, as torch casts). A copy whose dtype does not change is
bit-exact, and so is a slice unless scaled (scaling by a power of two is exact too).

Arrays are NumPy's (bfloat16 from ``ml_dtypes``): a build that runs no model (no domain
texts, no prompt rows) does not import torch, which would take longer than the rest of
a typical build. Random draws come from NumPy's ``PCG64`` generator, seeded per tensor
by the plan (``seed``, ``neuron_seed``, ``value_seed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from moecompose.dtypes import numpy_dtype
from moecompose.plan.recipe import PlannedTensor, Recipe, TensorRef
from moecompose.sources.safetensors_io import TensorEntry, read_array

CHUNK_BYTES = 16 * 1024 * 1024
F32 = np.dtype(np.float32)

Lookup = Callable[[TensorRef], TensorEntry]
Computed = Callable[[Recipe], np.ndarray]  # values of the model-computed ops (float32)
COMPUTED_OPS = ("domain", "prompt_state")


def _not_computed(recipe: Recipe) -> np.ndarray:
    raise ValueError(f"recipe op '{recipe.op}' needs values computed before the build")


def produce(
    tensor: PlannedTensor, lookup: Lookup, computed: Computed = _not_computed
) -> Iterator[np.ndarray]:
    """Yield consecutive chunks whose concatenation (row-major) is ``tensor``."""
    dtype = numpy_dtype(tensor.dtype)
    yield from _produce(tensor.recipe, tensor.shape, dtype, lookup, computed)


def _produce(
    recipe: Recipe, shape: tuple[int, ...], dtype: np.dtype, lookup: Lookup,
    computed: Computed,
) -> Iterator[np.ndarray]:
    if "repeat" in recipe.args:
        yield _repeat(recipe, shape, dtype, lookup, computed)
        return
    if recipe.op == "slice":
        yield from _slice(recipe, shape, dtype, lookup, computed)
        return
    if recipe.op == "stack":
        for part in recipe.parts:
            yield from _produce(part, shape[1:], dtype, lookup, computed)
        return
    if recipe.op == "nexus_gate":
        yield _nexus_gate(recipe, shape, computed).astype(dtype)
        return
    if recipe.op in COMPUTED_OPS:
        value = computed(recipe)
        if tuple(value.shape) != shape:
            raise ValueError(f"{recipe.summary()} has shape {tuple(value.shape)}, plan expects {shape}")
        yield value.astype(dtype, copy=False)
        return
    if recipe.op == "init":
        yield _init(recipe, shape, dtype)
        return
    if recipe.op == "drop":
        yield _drop(recipe, lookup).astype(dtype)
        return
    if recipe.op == "copy" and "index" in recipe.args:  # one slice of a stacked input
        entry = lookup(recipe.inputs[0])
        if entry.shape[1:] != shape:
            raise ValueError(f"{entry.file}: tensor has shape {entry.shape}, plan expects "
                             f"[N, {', '.join(map(str, shape))}]")
        j = recipe.args["index"]
        yield read_array(entry, (j, j + 1)).reshape(shape).astype(dtype, copy=False)
        return
    entries = [lookup(ref) for ref in recipe.inputs]
    for entry in entries:
        if entry.shape != shape:
            raise ValueError(f"{entry.file}: tensor has shape {entry.shape}, plan expects {shape}")
    rows = shape[0] if shape else 1
    row_bytes = max(1, 4 * (entries[0].numel // max(rows, 1)))
    step = max(1, CHUNK_BYTES // row_bytes)
    for a in range(0, rows, step):
        span = (a, min(rows, a + step)) if shape else None
        yield _elementwise(recipe, entries, span, dtype)


def _whole(
    recipe: Recipe, shape: tuple[int, ...], dtype: np.dtype, lookup: Lookup,
    computed: Computed,
) -> np.ndarray:
    """The tensor ``recipe`` makes, in memory at once."""
    chunks = [c.reshape(-1) for c in _produce(recipe, shape, dtype, lookup, computed)]
    return np.concatenate(chunks).reshape(shape)


def _repeat(
    recipe: Recipe, shape: tuple[int, ...], dtype: np.dtype, lookup: Lookup,
    computed: Computed,
) -> np.ndarray:
    """``repeat: G``: the recipe's ``shape[0] / G`` rows, each written G times in a row."""
    times = recipe.args["repeat"]
    if not shape or shape[0] % times:
        raise ValueError(f"{recipe.summary()}: shape {shape} has no whole rows x{times}")
    once = replace(recipe, args={k: v for k, v in recipe.args.items() if k != "repeat"})
    rows = _whole(once, (shape[0] // times, *shape[1:]), dtype, lookup, computed)
    return np.repeat(rows, times, axis=0)


def _slice(
    recipe: Recipe, shape: tuple[int, ...], dtype: np.dtype, lookup: Lookup,
    computed: Computed,
) -> Iterator[np.ndarray]:
    """``start:end`` along ``dim`` of the part's tensor, times ``scale``. A copied tensor
    is read a chunk of rows at a time; another part (``drop``) is made whole first."""
    inner = recipe.parts[0]
    dim, start, end = recipe.args["dim"], recipe.args["start"], recipe.args["end"]
    scale = recipe.args.get("scale", 1.0)
    if not inner.inputs:
        raise ValueError(f"{recipe.summary()}: a slice needs a part that reads a tensor")
    entry = lookup(inner.inputs[0])
    full = entry.shape[1:] if "index" in inner.args else entry.shape
    expected = (*full[:dim], end - start, *full[dim + 1:])
    if not 0 <= start < end <= full[dim] or expected != shape:
        raise ValueError(f"{entry.file}: tensor has shape {entry.shape}, plan expects "
                         f"{list(shape)} at {start}:{end} of dimension {dim}")
    cut = (slice(None),) * dim + (slice(start, end),)
    if inner.op == "copy" and not inner.args:
        rows = (start, end) if dim == 0 else (0, full[0])
        step = max(1, CHUNK_BYTES // max(1, 4 * (entry.numel // max(full[0], 1))))
        for a in range(rows[0], rows[1], step):
            x = read_array(entry, (a, min(rows[1], a + step)))
            yield _scaled(x if dim == 0 else x[cut], scale, dtype)
        return
    x = _whole(inner, full, F32, lookup, computed)
    yield _scaled(x[cut], scale, dtype)


def _scaled(x: np.ndarray, scale: float | None, dtype: np.dtype) -> np.ndarray:
    """``x * scale`` (in float32) as ``dtype``, contiguous."""
    if scale is not None and scale != 1.0:
        return (x.astype(F32) * np.float32(scale)).astype(dtype)
    return np.ascontiguousarray(x.astype(dtype, copy=False))


def _elementwise(
    recipe: Recipe, entries: list[TensorEntry], span: tuple[int, int] | None, dtype: np.dtype
) -> np.ndarray:
    if recipe.op == "copy":
        return _scaled(read_array(entries[0], span), recipe.args.get("scale"), dtype)
    if recipe.op in ("mean", "weighted"):
        weights = recipe.args.get("weights") or [None] * len(entries)
        acc: np.ndarray | None = None
        for entry, w in zip(entries, weights):
            x = read_array(entry, span)  # fresh: float32 inputs are scaled in place
            if w is not None:
                x = x.astype(F32, copy=False)
                x *= np.float32(w)
            if acc is None:
                acc = x.astype(F32, copy=False)
            else:  # a 16-bit input is widened in NumPy's small buffers, not a whole copy
                np.add(acc, x, out=acc)
        assert acc is not None
        if recipe.op == "mean":
            acc /= np.float32(len(entries))
        return acc.astype(dtype, copy=False)
    raise ValueError(f"unknown recipe op '{recipe.op}'")


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(seed)))


def _init(recipe: Recipe, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if recipe.args["init"] == "zeros":
        return np.zeros(shape, dtype=dtype)
    if recipe.args["init"] == "constant":
        return np.full(shape, recipe.args["value"], dtype=F32).astype(dtype)
    if recipe.args["init"] == "uniform":
        bound = np.float32(recipe.args["bound"])
        values = _rng(recipe.args["seed"]).random(shape, dtype=F32)  # [0, 1)
        return ((values * 2 - 1) * bound).astype(dtype, copy=False)
    values = _rng(recipe.args["seed"]).standard_normal(shape, dtype=F32)
    return (values * np.float32(recipe.args["std"])).astype(dtype, copy=False)


def _nexus_gate(recipe: Recipe, shape: tuple[int, ...], computed: Computed) -> np.ndarray:
    """Nexus expert embeddings ``(silu(z[:, :d]) * z[:, d:]) @ W2.T``, ``z = dom @ W1.T``,
    with W1, W2 drawn exactly as the native build draws them."""
    dom = np.stack([computed(part) for part in recipe.parts]).astype(F32)  # [n, m]
    d = shape[1]
    w1 = _init(Recipe("init", args=recipe.args["w1"]), (2 * d, dom.shape[1]), F32)
    w2 = _init(Recipe("init", args=recipe.args["w2"]), (d, d), F32)
    z = dom @ w1.T
    a, b = z[:, :d], z[:, d:]
    sigmoid = 0.5 * (1 + np.tanh(a / 2))  # no overflow for any a, unlike 1 / (1 + exp(-a))
    return (a * sigmoid * b) @ w2.T


def drop_indices(n: int, rate: float, seed: int) -> np.ndarray:
    """The neurons Drop-Upcycling re-initialises: ``round(rate * n)`` of ``n``, sorted."""
    count = round(rate * n)
    return np.sort(_rng(seed).permutation(n)[:count])


def _drop(recipe: Recipe, lookup: Lookup) -> np.ndarray:
    """Copy with a fraction of neurons redrawn from N(mean, std) of the replaced values.

    The same neurons (``neuron_seed`` is shared by one expert's gate, up and down) are
    rows of gate/up (``dim=0``) and columns of down (``dim=1``): Nakamura et al. 2025.
    """
    x = read_array(lookup(recipe.inputs[0])).astype(F32)
    dim = recipe.args["dim"]
    idx = drop_indices(x.shape[dim], recipe.args["rate"], recipe.args["neuron_seed"])
    if idx.size == 0:
        return x
    old = np.take(x, idx, axis=dim)
    std = old.std(ddof=1, dtype=np.float64) if old.size > 1 else 0.0
    mean = old.mean(dtype=np.float64)
    new = _rng(recipe.args["value_seed"]).standard_normal(old.shape, dtype=F32)
    cut = (slice(None),) * dim + (idx,)
    x[cut] = new * np.float32(std) + np.float32(mean)
    return x
