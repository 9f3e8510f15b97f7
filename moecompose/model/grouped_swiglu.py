"""Grouped SwiGLU experts over routed token slots, as opaque ops for `torch.compile`.

`grouped_swiglu(x, order, counts, gate, up, down)` computes, for every token slot
`n = t * k + j` (token t's j-th chosen expert e), `down_e(silu(gate_e x_t) * up_e x_t)`.
`order` [T*k] lists the slots sorted by expert (a stable argsort of the flattened expert
indices) and `counts` [E] the slots per expert, so expert e owns the sorted rows
`counts[:e].sum() : counts[:e+1].sum()`. Weights are stacked: `gate`, `up` [E, f, d],
`down` [E, d, f].

The two GEMM stages are `torch.library.custom_op`s with fake implementations and
custom-op backwards, so dynamo and AOTAutograd see single nodes whose output shapes
depend only on input shapes; the per-expert counts are read inside the ops, never in the
traced program. The SwiGLU nonlinearity between them stays in the graph, where Inductor
fuses it (and its backward) into one pass.

* `moecompose::grouped_gate_up`: gathers token rows into expert order and runs each
  expert's gate and up GEMMs on a contiguous row slice, written in place
  (`torch.mm(..., out=)`) -> g, u [N, f], and the gathered rows [N, d] (kept for the
  weight gradients), all in expert order.
* `moecompose::grouped_down`: each expert's down GEMM, then a gather back to slot
  order -> [N, d].

Permutations are applied as gathers in both directions (the backward of a gather by
`order` is a gather by its inverse), so nothing scatter-adds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _spans(counts: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) in expert order, for each expert that has rows."""
    spans, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


def _zero_idle(spans: list[tuple[int, int, int]], *grads: Tensor) -> None:
    """Zero the weight gradients of experts that received no rows."""
    busy = {e for e, _, _ in spans}
    for e in range(grads[0].shape[0]):
        if e not in busy:
            for grad in grads:
                grad[e].zero_()


def _inverse(order: Tensor) -> Tensor:
    """Expert-order row of every slot: `inverse[order] = arange`."""
    arange = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).scatter_(0, order, arange)


# --------------------------------------------------------------------------- gate / up


@torch.library.custom_op("moecompose::grouped_gate_up", mutates_args=())
def _grouped_gate_up(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    k = order.numel() // x.shape[0]
    xs = x.index_select(0, order // k)  # [N, d] expert order
    g = xs.new_empty(xs.shape[0], gate.shape[1])  # [N, f]
    u = torch.empty_like(g)
    for e, s, t in _spans(counts):
        torch.mm(xs[s:t], gate[e].t(), out=g[s:t])
        torch.mm(xs[s:t], up[e].t(), out=u[s:t])
    return g, u, xs


@_grouped_gate_up.register_fake
def _(x, order, counts, gate, up):
    shape = (order.shape[0], gate.shape[1])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(order.shape[0], x.shape[1])


@torch.library.custom_op("moecompose::grouped_gate_up_backward", mutates_args=())
def _grouped_gate_up_backward(
    dg: Tensor,
    du: Tensor,
    xs: Tensor,
    order: Tensor,
    counts: Tensor,
    gate: Tensor,
    up: Tensor,
    k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    dxs = torch.empty_like(xs)  # [N, d] expert order
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    spans = _spans(counts)
    for e, s, t in spans:
        torch.mm(dg[s:t].t(), xs[s:t], out=dgate[e])  # [f, d]
        torch.mm(du[s:t].t(), xs[s:t], out=dup[e])
        torch.mm(dg[s:t], gate[e], out=dxs[s:t])  # [n, d]
        dxs[s:t].addmm_(du[s:t], up[e])
    _zero_idle(spans, dgate, dup)
    slots = dxs.index_select(0, _inverse(order)).view(-1, k, xs.shape[1])  # [T, k, d]
    dx = slots[:, 0].clone()
    for j in range(1, k):
        dx += slots[:, j]
    return dx, dgate, dup


@_grouped_gate_up_backward.register_fake
def _(dg, du, xs, order, counts, gate, up, k):
    return xs.new_empty(xs.shape[0] // k, xs.shape[1]), torch.empty_like(gate), torch.empty_like(up)


def _gate_up_setup_context(ctx, inputs, output) -> None:
    x, order, counts, gate, up = inputs
    ctx.k = order.shape[0] // x.shape[0]
    ctx.save_for_backward(output[2], order, counts, gate, up)


def _gate_up_backward(ctx, dg, du, _dxs):
    xs, order, counts, gate, up = ctx.saved_tensors
    dx, dgate, dup = _grouped_gate_up_backward(
        dg.contiguous(), du.contiguous(), xs, order, counts, gate, up, ctx.k
    )
    return dx, None, None, dgate, dup


_grouped_gate_up.register_autograd(_gate_up_backward, setup_context=_gate_up_setup_context)


# --------------------------------------------------------------------------- down


@torch.library.custom_op("moecompose::grouped_down", mutates_args=())
def _grouped_down(h: Tensor, order: Tensor, counts: Tensor, down: Tensor) -> Tensor:
    h = h.contiguous()
    ys = h.new_empty(h.shape[0], down.shape[1])  # [N, d] expert order
    for e, s, t in _spans(counts):
        torch.mm(h[s:t], down[e].t(), out=ys[s:t])
    return ys.index_select(0, _inverse(order))  # slot order


@_grouped_down.register_fake
def _(h, order, counts, down):
    return h.new_empty(h.shape[0], down.shape[1])


@torch.library.custom_op("moecompose::grouped_down_backward", mutates_args=())
def _grouped_down_backward(
    dy: Tensor, h: Tensor, order: Tensor, counts: Tensor, down: Tensor
) -> tuple[Tensor, Tensor]:
    h = h.contiguous()
    dys = dy.index_select(0, order)  # [N, d] expert order
    dh = torch.empty_like(h)
    ddown = torch.empty_like(down)
    spans = _spans(counts)
    for e, s, t in spans:
        torch.mm(dys[s:t].t(), h[s:t], out=ddown[e])  # [d, f]
        torch.mm(dys[s:t], down[e], out=dh[s:t])  # [n, f]
    _zero_idle(spans, ddown)
    return dh, ddown


@_grouped_down_backward.register_fake
def _(dy, h, order, counts, down):
    return torch.empty_like(h), torch.empty_like(down)


def _down_setup_context(ctx, inputs, output) -> None:
    h, order, counts, down = inputs
    ctx.save_for_backward(h, order, counts, down)


def _down_backward(ctx, dy):
    h, order, counts, down = ctx.saved_tensors
    dh, ddown = _grouped_down_backward(dy, h, order, counts, down)
    return dh, None, None, ddown


_grouped_down.register_autograd(_down_backward, setup_context=_down_setup_context)


# --------------------------------------------------------------------------- public


def grouped_swiglu(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor
) -> Tensor:
    """x [T, d], order [T*k], counts [E] -> every slot's expert output [T*k, d], slot order."""
    g, u, _ = _grouped_gate_up(x, order, counts, gate, up)  # [N, f] expert order
    return _grouped_down(F.silu(g) * u, order, counts, down)
