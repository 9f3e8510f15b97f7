"""Grouped SwiGLU over expert-sorted rows, as one opaque op for `torch.compile`.

`grouped_swiglu(x, counts, gate, up, down)` takes the rows `x` [N, d] already sorted by
expert, `counts` [E] rows per expert, and stacked weights `gate`, `up` [E, f, d],
`down` [E, d, f]; rows `counts[:e].sum() : counts[:e+1].sum()` go through expert `e`.

Forward and backward are `torch.library.custom_op`s with fake (meta) implementations, so
dynamo and AOTAutograd trace through them as single nodes: the per-expert row counts are
read only inside the op, never in the traced program. Inside, every expert is three
dense GEMMs on contiguous row slices written in place (`torch.mm(..., out=)`); the
forward also returns the gate and up activations [N, f] so the backward does not
recompute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _spans(counts: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) for each expert that received rows."""
    spans, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


@torch.library.custom_op("moecompose::grouped_swiglu", mutates_args=())
def _grouped_swiglu(
    x: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    x = x.contiguous()
    N, d = x.shape
    f = gate.shape[1]
    y = x.new_empty(N, d)
    g = x.new_empty(N, f)
    u = x.new_empty(N, f)
    for e, s, t in _spans(counts):
        torch.mm(x[s:t], gate[e].t(), out=g[s:t])
        torch.mm(x[s:t], up[e].t(), out=u[s:t])
        torch.mm(F.silu(g[s:t]).mul_(u[s:t]), down[e].t(), out=y[s:t])
    return y, g, u


@_grouped_swiglu.register_fake
def _(x: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor):
    N, d = x.shape
    f = gate.shape[1]
    return x.new_empty(N, d), x.new_empty(N, f), x.new_empty(N, f)


@torch.library.custom_op("moecompose::grouped_swiglu_backward", mutates_args=())
def _grouped_swiglu_backward(
    dy: Tensor,
    x: Tensor,
    counts: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    g: Tensor,
    u: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    dgate, dup, ddown = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(down)
    spans = _spans(counts)
    for e, s, t in spans:
        sig = torch.sigmoid(g[s:t])  # [n, f]
        act = g[s:t] * sig  # silu(g)
        torch.mm(dy[s:t].t(), act * u[s:t], out=ddown[e])  # [d, f]
        dh = dy[s:t] @ down[e]  # [n, f]
        du = dh * act
        dsilu = sig.mul_(torch.sub(1, sig).mul_(g[s:t]).add_(1))  # silu'(g)
        dg = dh.mul_(u[s:t]).mul_(dsilu)
        torch.mm(dg.t(), x[s:t], out=dgate[e])  # [f, d]
        torch.mm(du.t(), x[s:t], out=dup[e])
        torch.mm(dg, gate[e], out=dx[s:t])  # [n, d]
        dx[s:t].addmm_(du, up[e])
    for e in set(range(gate.shape[0])) - {e for e, _, _ in spans}:
        dgate[e].zero_(), dup[e].zero_(), ddown[e].zero_()
    return dx, dgate, dup, ddown


@_grouped_swiglu_backward.register_fake
def _(dy, x, counts, gate, up, down, g, u):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(up), torch.empty_like(down)


def _setup_context(ctx, inputs, output) -> None:
    x, counts, gate, up, down = inputs
    _, g, u = output
    ctx.save_for_backward(x, counts, gate, up, down, g, u)


def _backward(ctx, dy, _dg, _du):
    x, counts, gate, up, down, g, u = ctx.saved_tensors
    dx, dgate, dup, ddown = _grouped_swiglu_backward(dy, x, counts, gate, up, down, g, u)
    return dx, None, dgate, dup, ddown


_grouped_swiglu.register_autograd(_backward, setup_context=_setup_context)


def grouped_swiglu(x: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """Expert-sorted rows x [N, d], counts [E] -> `down_e(silu(gate_e x) * up_e x)` [N, d]."""
    return _grouped_swiglu(x, counts, gate, up, down)[0]
