"""Recipe execution: turn one planned tensor into its bytes, a chunk at a time.

Elementwise recipes (copy, mean, weighted) work on row ranges of their inputs, so even
the embedding matrix never sits in memory whole; expert parts of a ``stack`` are
produced one expert at a time, and a ``slice`` of a copied tensor (a fine-grained expert's
shard) a chunk of rows at a time. Arithmetic is float32; the result is cast to the output
dtype. A copy whose dtype does not change is bit-exact, and so is a slice unless scaled
(scaling by a power of two is exact too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from moecompose.dtypes import torch_dtype
from moecompose.plan.recipe import PlannedTensor, Recipe, TensorRef
from moecompose.sources.safetensors_io import TensorEntry, read_tensor

CHUNK_BYTES = 16 * 1024 * 1024

Lookup = Callable[[TensorRef], TensorEntry]
Computed = Callable[[Recipe], torch.Tensor]  # values of the model-computed ops
COMPUTED_OPS = ("domain", "prompt_state")


def _not_computed(recipe: Recipe) -> torch.Tensor:
    raise ValueError(f"recipe op '{recipe.op}' needs values computed before the build")


def produce(
    tensor: PlannedTensor, lookup: Lookup, computed: Computed = _not_computed
) -> Iterator[torch.Tensor]:
    """Yield consecutive chunks whose concatenation (row-major) is ``tensor``."""
    dtype = torch_dtype(tensor.dtype)
    yield from _produce(tensor.recipe, tensor.shape, dtype, lookup, computed)


def _produce(
    recipe: Recipe, shape: tuple[int, ...], dtype: torch.dtype, lookup: Lookup,
    computed: Computed,
) -> Iterator[torch.Tensor]:
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
        yield _nexus_gate(recipe, shape, computed).to(dtype)
        return
    if recipe.op in COMPUTED_OPS:
        value = computed(recipe)
        if tuple(value.shape) != shape:
            raise ValueError(f"{recipe.summary()} has shape {tuple(value.shape)}, plan expects {shape}")
        yield value.to(dtype)
        return
    if recipe.op == "init":
        yield _init(recipe, shape, dtype)
        return
    if recipe.op == "drop":
        yield _drop(recipe, lookup).to(dtype)
        return
    if recipe.op == "copy" and "index" in recipe.args:  # one slice of a stacked input
        entry = lookup(recipe.inputs[0])
        if entry.shape[1:] != shape:
            raise ValueError(f"{entry.file}: tensor has shape {entry.shape}, plan expects "
                             f"[N, {', '.join(map(str, shape))}]")
        j = recipe.args["index"]
        yield read_tensor(entry, (j, j + 1)).reshape(shape).to(dtype)
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
    recipe: Recipe, shape: tuple[int, ...], dtype: torch.dtype, lookup: Lookup,
    computed: Computed,
) -> torch.Tensor:
    """The tensor ``recipe`` makes, in memory at once."""
    chunks = [c.reshape(-1) for c in _produce(recipe, shape, dtype, lookup, computed)]
    return torch.cat(chunks).reshape(shape)


def _repeat(
    recipe: Recipe, shape: tuple[int, ...], dtype: torch.dtype, lookup: Lookup,
    computed: Computed,
) -> torch.Tensor:
    """``repeat: G``: the recipe's ``shape[0] / G`` rows, each written G times in a row."""
    times = recipe.args["repeat"]
    if not shape or shape[0] % times:
        raise ValueError(f"{recipe.summary()}: shape {shape} has no whole rows x{times}")
    once = replace(recipe, args={k: v for k, v in recipe.args.items() if k != "repeat"})
    rows = _whole(once, (shape[0] // times, *shape[1:]), dtype, lookup, computed)
    return rows.repeat_interleave(times, dim=0)


def _slice(
    recipe: Recipe, shape: tuple[int, ...], dtype: torch.dtype, lookup: Lookup,
    computed: Computed,
) -> Iterator[torch.Tensor]:
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
    if inner.op == "copy" and not inner.args:
        rows = (start, end) if dim == 0 else (0, full[0])
        step = max(1, CHUNK_BYTES // max(1, 4 * (entry.numel // max(full[0], 1))))
        for a in range(rows[0], rows[1], step):
            x = read_tensor(entry, (a, min(rows[1], a + step)))
            yield _scaled(x if dim == 0 else x.narrow(dim, start, end - start), scale, dtype)
        return
    x = _whole(inner, full, torch.float32, lookup, computed)
    yield _scaled(x.narrow(dim, start, end - start), scale, dtype)


def _scaled(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if scale != 1.0:
        return (x.to(torch.float32) * scale).to(dtype)
    return x.to(dtype).contiguous()


def _elementwise(
    recipe: Recipe, entries: list[TensorEntry], span: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    if recipe.op == "copy":
        x = read_tensor(entries[0], span)
        scale = recipe.args.get("scale")
        if scale is not None and scale != 1.0:
            return (x.to(torch.float32) * scale).to(dtype)
        return x.to(dtype)
    if recipe.op in ("mean", "weighted"):
        weights = recipe.args.get("weights") or [None] * len(entries)
        acc: torch.Tensor | None = None
        for entry, w in zip(entries, weights):
            x = read_tensor(entry, span).to(torch.float32)
            if w is not None:
                x.mul_(w)
            acc = x if acc is None else acc.add_(x)
        assert acc is not None
        if recipe.op == "mean":
            acc.div_(len(entries))
        return acc.to(dtype)
    raise ValueError(f"unknown recipe op '{recipe.op}'")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _init(recipe: Recipe, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if recipe.args["init"] == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if recipe.args["init"] == "constant":
        return torch.full(shape, float(recipe.args["value"]), dtype=dtype)
    if recipe.args["init"] == "uniform":
        bound = recipe.args["bound"]
        values = torch.rand(shape, generator=_generator(recipe.args["seed"]), dtype=torch.float32)
        return ((values * 2 - 1) * bound).to(dtype)
    values = torch.randn(shape, generator=_generator(recipe.args["seed"]), dtype=torch.float32)
    return (values * recipe.args["std"]).to(dtype)


def _nexus_gate(recipe: Recipe, shape: tuple[int, ...], computed: Computed) -> torch.Tensor:
    """Nexus expert embeddings ``(silu(z[:, :d]) * z[:, d:]) @ W2.T``, ``z = dom @ W1.T``,
    with W1, W2 drawn exactly as the native build draws them."""
    dom = torch.stack([computed(part) for part in recipe.parts])  # [n, m]
    d = shape[1]
    w1 = _init(Recipe("init", args=recipe.args["w1"]), (2 * d, dom.shape[1]), torch.float32)
    w2 = _init(Recipe("init", args=recipe.args["w2"]), (d, d), torch.float32)
    a, b = (dom @ w1.T).split(d, dim=-1)
    return (torch.nn.functional.silu(a) * b) @ w2.T


def drop_indices(n: int, rate: float, seed: int) -> torch.Tensor:
    """The neurons Drop-Upcycling re-initialises: ``round(rate * n)`` of ``n``, sorted."""
    count = round(rate * n)
    return torch.randperm(n, generator=_generator(seed))[:count].sort().values


def _drop(recipe: Recipe, lookup: Lookup) -> torch.Tensor:
    """Copy with a fraction of neurons redrawn from N(mean, std) of the replaced values.

    The same neurons (``neuron_seed`` is shared by one expert's gate, up and down) are
    rows of gate/up (``dim=0``) and columns of down (``dim=1``): Nakamura et al. 2025.
    """
    x = read_tensor(lookup(recipe.inputs[0])).to(torch.float32)
    dim = recipe.args["dim"]
    idx = drop_indices(x.shape[dim], recipe.args["rate"], recipe.args["neuron_seed"])
    if idx.numel() == 0:
        return x
    old = x.index_select(dim, idx)
    std = old.std() if old.numel() > 1 else torch.tensor(0.0)
    new = torch.randn(old.shape, generator=_generator(recipe.args["value_seed"]))
    return x.index_copy_(dim, idx, new * std + old.mean())
