"""Grouped SwiGLU experts over routed token slots, as one opaque op for `torch.compile`.

`grouped_swiglu(x, order, counts, gate, up, down)` computes, for every token slot
`n = t * k + j` (token t's j-th chosen expert e), `down_e(silu(gate_e x_t) * up_e x_t)`;
with `activation="gelu_tanh"`, `down_e(gelu_tanh(gate_e x_t) * up_e x_t)` (GeGLU experts,
Gemma), the backward using aten's `gelu_backward` where SwiGLU uses `silu_backward`.
`order` [N = T*k] lists the slots sorted by expert (a stable argsort of the flattened
expert indices) and `counts` [E] the slots per expert, so expert e owns the sorted rows
`counts[:e].sum() : counts[:e+1].sum()`. Weights are stacked: `gate`, `up` [E, f, d],
`down` [E, d, f].

Forward and backward are `torch.library.custom_op`s with fake implementations, so dynamo
and AOTAutograd see one node each, whose output shapes depend only on input shapes; the
per-expert counts are read inside the ops, never in the traced program.

Inside, experts run one after another: gather the expert's token rows (`index_select`),
GEMMs on them (`torch.mm(..., out=)` into row slices where the result is kept), the gated
nonlinearity, and the result copied to its slots (`index_copy_`: a permutation, nothing
accumulates). Temporaries are expert-sized; the only [N, *] buffers are the output and,
when autograd needs them, the gate/up activations g, u [N, f] (saved, not recomputed).
The backward mirrors this and adds input gradients with `index_add_`.

Two kernels sit behind the same ops. The loop above reads the per-expert counts on the
host (`counts.tolist()`), which on a GPU is a host-device sync per layer and a few kernel
launches per expert. With bf16 tensors on CUDA (widths multiples of 8, so that strides are
16-byte aligned) the ops use `torch._grouped_mm` instead: one grouped GEMM per weight
over all experts, the expert boundaries given as device-side int32 offsets, no sync; its
input gradient is summed over each token's k slots after a permutation (`index_copy_`,
then a sum), never with atomics, so it is deterministic. `grouped_mm_kernel(True)` turns
that path on for CPU bf16 too (torch has an eager CPU kernel), which is how its numerics
are tested against the loop without a GPU.

Under `torch.autocast` the ops run like `mm` (`autocast_rule`): the forward ops in the
autocast dtype, their floating-point inputs cast to it first (casts that autograd sees, so
fp32 weights get fp32 gradients), the backward op in the dtypes the forward saved, and none
with autocast on inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from moecompose.model.activations import GATE_ACTIVATIONS, gate_activation_backward

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIB = torch.library.Library("moecompose", "FRAGMENT")


def autocast_rule(name: str, cast: bool) -> None:
    """Register how the op `moecompose::{name}` runs inside `torch.autocast` on CPU and
    CUDA: with autocast off inside (else its `mm`s would return the autocast dtype next to
    tensors that are not in it); with `cast`, its floating-point tensor inputs (fp64 aside)
    first cast to the region's autocast dtype (`torch.get_autocast_dtype`: bf16, fp16), as
    autocast treats `mm`; without, in the dtypes it is given (backward ops, which get what
    the forward saved; layout ops).

    Unlike `torch.library.register_autocast`, which fixes one dtype per device, the dtype
    is the region's. The rule sits at the autocast dispatch key, so it is part of the op:
    Dynamo and AOTAutograd trace it (the casts become graph nodes, which autograd sees,
    so fp32 weights get fp32 gradients) and the op's fake and autograd registrations
    apply below it."""
    op = getattr(torch.ops.moecompose, name).default

    for device, key in _AUTOCAST_KEYS.items():

        def kernel(*args: object, device: str = device) -> object:
            if cast:
                dtype = torch.get_autocast_dtype(device)
                args = tuple(
                    a.to(dtype)
                    if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
                    else a
                    for a in args
                )
            with torch.autocast(device, enabled=False):
                return op(*args)

        _LIB.impl(name, kernel, key)


_GROUPED_MM_ON_CPU = False


@contextlib.contextmanager
def grouped_mm_kernel(enabled: bool = True) -> Iterator[None]:
    """Within the block, bf16 expert ops on the CPU also use `torch._grouped_mm` (CUDA
    always does): for testing that kernel's numerics and gradients on a machine without
    a GPU."""
    global _GROUPED_MM_ON_CPU
    before, _GROUPED_MM_ON_CPU = _GROUPED_MM_ON_CPU, enabled
    try:
        yield
    finally:
        _GROUPED_MM_ON_CPU = before


def uses_grouped_mm(x: Tensor, *weights: Tensor) -> bool:
    """Whether the expert ops run on `torch._grouped_mm` for these tensors: bf16 on CUDA
    (or on the CPU within `grouped_mm_kernel`), every width a multiple of 8."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16:
        return False
    if any(w.dtype != torch.bfloat16 for w in weights):
        return False
    if any(size % 8 for w in weights for size in w.shape[1:]):
        return False
    return x.is_cuda or (x.device.type == "cpu" and _GROUPED_MM_ON_CPU)


def _gmm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """`torch._grouped_mm`: a [N, K] rows grouped by `offsets` times b [E, K, M] -> [N, M];
    or a [K, N] and b [N, M], both grouped along N -> [E, K, M] (weight gradients)."""
    return torch._grouped_mm(a, b, offs=offsets)


def _offsets(counts: Tensor) -> Tensor:
    """Where each expert's rows end [E], int32, on the device."""
    return counts.cumsum(0, dtype=torch.int32)


def _forward_grouped_mm(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor, keep: bool,
    activation: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`_forward` on grouped GEMMs, no host sync: the same outputs."""
    offsets = _offsets(counts)
    xs = x.index_select(0, order // (order.numel() // x.shape[0]))  # [N, d] expert order
    g = _gmm(xs, gate.transpose(1, 2), offsets)  # [N, f]
    u = _gmm(xs, up.transpose(1, 2), offsets)
    h = GATE_ACTIVATIONS[activation](g) * u
    ys = _gmm(h, down.transpose(1, 2), offsets)  # [N, d]
    y = torch.empty_like(ys).index_copy_(0, order, ys)  # slot order: a permutation
    return y, g if keep else None, u if keep else None


def _backward_grouped_mm(
    dy: Tensor, x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor,
    down: Tensor, g: Tensor, u: Tensor, input_grad: bool, weight_grads: bool, activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_grouped_swiglu_backward` on grouped GEMMs, no host sync, deterministic."""
    T, N = x.shape[0], order.numel()
    offsets = _offsets(counts)
    xs = x.index_select(0, order // (N // T))  # [N, d] expert order
    dys = dy.index_select(0, order)  # [N, d]
    act = GATE_ACTIVATIONS[activation](g)  # [N, f]
    dh = _gmm(dys, down, offsets)  # [N, f]
    du = dh * act
    dg = gate_activation_backward(activation, dh.mul_(u), g)
    dx = dgate = dup = ddown = None
    if weight_grads:
        ddown = _gmm(dys.t(), act.mul_(u), offsets)  # [E, d, f]; an expert without rows: 0
        dgate = _gmm(dg.t(), xs, offsets)  # [E, f, d]
        dup = _gmm(du.t(), xs, offsets)
    if input_grad:
        dxs = _gmm(dg, gate, offsets).add_(_gmm(du, up, offsets))  # [N, d] expert order
        slots = torch.empty_like(dxs).index_copy_(0, order, dxs)  # [N, d] slot order
        dx = slots.view(T, N // T, -1).sum(dim=1)  # each token's k slots, summed in order
    empty = x.new_empty(0)
    return (
        empty if dx is None else dx,
        *(empty if w is None else w for w in (dgate, dup, ddown)),
    )


def _spans(counts: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) in expert order, for each expert that has rows."""
    spans, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


def _forward(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor, keep: bool,
    activation: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """y [N, d] in slot order; with `keep`, also g, u [N, f] in expert order."""
    if uses_grouped_mm(x, gate, up, down):
        return _forward_grouped_mm(x, order, counts, gate, up, down, keep, activation)
    act = GATE_ACTIVATIONS[activation]
    N, f = order.numel(), gate.shape[1]
    token = order // (N // x.shape[0])  # [N] token of each sorted row
    g = x.new_empty(N, f) if keep else None
    u = x.new_empty(N, f) if keep else None
    y = x.new_empty(N, x.shape[1])
    for e, s, t in _spans(counts):
        xe = x.index_select(0, token[s:t])  # [n, d]
        ge = torch.mm(xe, gate[e].t(), out=None if g is None else g[s:t])  # [n, f]
        ue = torch.mm(xe, up[e].t(), out=None if u is None else u[s:t])
        h = act(ge).mul_(ue)
        y.index_copy_(0, order[s:t], torch.mm(h, down[e].t()))
    return y, g, u


@torch.library.custom_op("moecompose::grouped_swiglu", mutates_args=())
def _grouped_swiglu(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
    activation: str = "silu",
) -> tuple[Tensor, Tensor, Tensor]:
    y, g, u = _forward(x, order, counts, gate, up, down, True, activation)
    assert g is not None and u is not None
    return y, g, u


@_grouped_swiglu.register_fake
def _(x, order, counts, gate, up, down, activation="silu"):
    N, f = order.shape[0], gate.shape[1]
    return x.new_empty(N, x.shape[1]), x.new_empty(N, f), x.new_empty(N, f)


@torch.library.custom_op("moecompose::grouped_swiglu_inference", mutates_args=())
def _grouped_swiglu_inference(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
    activation: str = "silu",
) -> Tensor:
    return _forward(x, order, counts, gate, up, down, False, activation)[0]


@_grouped_swiglu_inference.register_fake
def _(x, order, counts, gate, up, down, activation="silu"):
    return x.new_empty(order.shape[0], x.shape[1])


@torch.library.custom_op("moecompose::grouped_swiglu_backward", mutates_args=())
def _grouped_swiglu_backward(
    dy: Tensor,
    x: Tensor,
    order: Tensor,
    counts: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    g: Tensor,
    u: Tensor,
    input_grad: bool,
    weight_grads: bool,
    activation: str = "silu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x and of the three weights; the ones not asked for come back empty."""
    if uses_grouped_mm(x, gate, up, down):
        return _backward_grouped_mm(dy, x, order, counts, gate, up, down, g, u, input_grad,
                                    weight_grads, activation)
    act_fn = GATE_ACTIVATIONS[activation]
    token = order // (order.numel() // x.shape[0])
    dx = torch.zeros_like(x) if input_grad else x.new_empty(0)  # [T, d]
    dgate, dup, ddown = (
        torch.empty_like(w) if weight_grads else w.new_empty(0) for w in (gate, up, down)
    )
    spans = _spans(counts)
    for e, s, t in spans:
        xe = x.index_select(0, token[s:t])  # [n, d]
        dye = dy.index_select(0, order[s:t])  # [n, d]
        ge, ue = g[s:t], u[s:t]  # [n, f]
        act = act_fn(ge)
        dh = torch.mm(dye, down[e])  # [n, f]
        du = dh * act
        if weight_grads:
            torch.mm(dye.t(), act.mul_(ue), out=ddown[e])  # [d, f], act * u = h
        dg = gate_activation_backward(activation, dh.mul_(ue), ge)
        if weight_grads:
            torch.mm(dg.t(), xe, out=dgate[e])  # [f, d]
            torch.mm(du.t(), xe, out=dup[e])
        if input_grad:
            dx.index_add_(0, token[s:t], torch.mm(dg, gate[e]).addmm_(du, up[e]))
    if weight_grads:
        for e in sorted(set(range(gate.shape[0])) - {e for e, _, _ in spans}):
            dgate[e].zero_(), dup[e].zero_(), ddown[e].zero_()
    return dx, dgate, dup, ddown


@_grouped_swiglu_backward.register_fake
def _(dy, x, order, counts, gate, up, down, g, u, input_grad, weight_grads, activation="silu"):
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    dws = (torch.empty_like(w) if weight_grads else w.new_empty(0) for w in (gate, up, down))
    return (dx, *dws)


def _setup_context(ctx, inputs, output) -> None:
    x, order, counts, gate, up, down, activation = inputs
    _, g, u = output
    ctx.save_for_backward(x, order, counts, gate, up, down, g, u)
    ctx.activation = activation


def _backward(ctx, dy, _dg, _du):
    x, order, counts, gate, up, down, g, u = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    weight_grads = any(ctx.needs_input_grad[3:6])
    dx, dgate, dup, ddown = _grouped_swiglu_backward(
        dy, x, order, counts, gate, up, down, g, u, input_grad, weight_grads, ctx.activation
    )
    if not weight_grads:
        dgate = dup = ddown = None
    return dx if input_grad else None, None, None, dgate, dup, ddown, None


_grouped_swiglu.register_autograd(_backward, setup_context=_setup_context)
autocast_rule("grouped_swiglu", cast=True)
autocast_rule("grouped_swiglu_inference", cast=True)
autocast_rule("grouped_swiglu_backward", cast=False)


def grouped_swiglu(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
    activation: str = "silu",
) -> Tensor:
    """x [T, d], order [T*k], counts [E] -> every slot's expert output [T*k, d], slot order;
    `activation`: the gate's, "silu" (SwiGLU) or "gelu_tanh" (GeGLU).

    Without autograd (inference, frozen experts and input) the gate/up activations are
    not kept, so every temporary is expert-sized.
    """
    needs_grad = any(t.requires_grad for t in (x, gate, up, down))
    if torch.is_grad_enabled() and needs_grad:
        return _grouped_swiglu(x, order, counts, gate, up, down, activation)[0]
    return _grouped_swiglu_inference(x, order, counts, gate, up, down, activation)
