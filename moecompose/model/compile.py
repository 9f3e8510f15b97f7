"""`compile_model`: one `torch.compile` graph for every batch size and sequence length.

Why `shapes_spec`: with plain `dynamic=True`, dynamo gives batch and sequence length
*backed* symbols. Backed symbols are specialised when they are 0 or 1, so a first call
at batch 1 or length 1 (decoding) compiles a second graph, and Inductor adds guards of
its own from the sizes it saw (for instance `B*S <= 4096`, where it picks a summation
strategy), which recompile later at larger sizes. `backed_size_oblivious` removes the
0/1 specialisation but not the Inductor guards, and it breaks the CPU flash-attention
lowering at length 1.

Torch 2.13's `torch.compile(shapes_spec=...)` declares `B` and `S` as *unbacked*
symbols (`ShapeVar(min=1)`) for `input_ids`, `attention_mask`, `position_ids` and `labels`
([B, S] each). Unbacked sizes are never specialised and never guarded on, so the graph
compiled on the first call serves every later shape; nothing in the forward pass
branches on a size (MoE dispatch reads expert counts only inside the opaque
`moecompose::grouped_swiglu*` ops). Marking the inputs with
`torch._dynamo.decorators.mark_unbacked` on every call (plus `torch._check(size >= 1)` in
the forward for attention) works too, but needs a wrapper module around the compiled
one; `shapes_spec` keeps the result of `compile_model` a plain compiled module.
Passing a mask where an earlier call passed None, or switching grad mode, compiles one
more graph, as for any compiled module.

Decode compiled with a `StaticKVCache` (`model.new_cache(max_length=..., batch_size=...)`;
`model.generate(..., forward=compile_model(model))` makes one): its buffers have fixed
shapes and the write position is a tensor, so the prompt and every decode step run the
graph compiled for the first call (one more per batch size or `max_length`, which the
buffers' shapes pin). A growing `KVCache` is not shape-stable: its tensors get one token
longer every step and are not covered by `shapes_spec`, so every new length compiles
another graph until the recompile limit; use it eagerly.

On a torch without `shapes_spec` this falls back to `dynamic=True`: correct, but the
first calls with a batch or a length of 1 each compile one more graph.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_SHAPED_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


def supports_shapes_spec() -> bool:
    """Whether this torch has `torch.compile(shapes_spec=...)`."""
    return "shapes_spec" in inspect.signature(torch.compile).parameters


def token_shapes_spec() -> Any:
    """Unbacked batch and sequence sizes (both >= 1) for the model's [B, S] inputs."""
    from torch.fx.experimental.dynamic_spec import ShapesSpec, ShapeVar, TensorSpec

    batch, seq = ShapeVar("batch", min=1), ShapeVar("seq", min=1)
    return ShapesSpec({name: TensorSpec([batch, seq]) for name in _SHAPED_INPUTS})


def compile_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """`torch.compile(model, fullgraph=True)` with batch and sequence length dynamic.

    `kwargs` go to `torch.compile` (`mode`, `backend`, `options`, ...); an explicit
    `dynamic` or `shapes_spec` replaces the default described in the module docstring.
    """
    kwargs.setdefault("fullgraph", True)
    if "dynamic" not in kwargs and "shapes_spec" not in kwargs:
        if supports_shapes_spec():
            kwargs["shapes_spec"] = token_shapes_spec()
        else:
            kwargs["dynamic"] = True
    return torch.compile(model, **kwargs)
