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

Two kernels, each behind ops of its own with the same schemas, fake, autograd and autocast
registrations (`LOOP_OPS`, `GROUPED_MM_OPS`), chosen by `grouped_swiglu` from dtypes,
devices and shapes (`uses_grouped_mm`). The loop above reads the per-expert counts on the
host (`counts.tolist()`), which on a GPU is a host-device sync per layer and a few kernel
launches per expert; its ops are tagged `cudagraph_unsafe` (`kernel_op`). With bf16
tensors on CUDA (widths multiples of 8, so that strides are 16-byte aligned) the ops use
`torch._grouped_mm` instead: one grouped GEMM per weight over all experts, the expert
boundaries given as device-side int32 offsets, no sync, so CUDA graphs may capture them;
its input gradient is summed over each token's k slots after a permutation
(`index_copy_`, then a sum), never with atomics, so it is deterministic.
`grouped_mm_kernel(True)` turns that path on for CPU bf16 too (torch has an eager CPU
kernel), which is how its numerics are tested against the loop without a GPU.

Under `torch.autocast` the ops run like `mm` (`autocast_rule`): the forward ops in the
autocast dtype, their floating-point inputs cast to it first (casts that autograd sees, so
fp32 weights get fp32 gradients), the backward op in the dtypes the forward saved, and none
with autocast on inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.library import CustomOpDef

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
    (or on the CPU within `grouped_mm_kernel`), every width a multiple of 8. Inside an
    autocast region they run in its dtype (`autocast_rule`), and that is the one that
    counts. From dtypes, devices and shapes only: compiled code decides while tracing."""
    device = x.device.type
    if not hasattr(torch, "_grouped_mm") or not (
        device == "cuda" or (device == "cpu" and _GROUPED_MM_ON_CPU)
    ):
        return False
    if any(size % 8 for w in weights for size in w.shape[1:]):
        return False
    return all(_runs_in(t) == torch.bfloat16 for t in (x, *weights))


def _runs_in(t: Tensor) -> torch.dtype:
    """The dtype a forward op computes t in: inside an autocast region the region's, as
    `autocast_rule` casts (fp64 aside), else t's own."""
    device = t.device.type
    if torch.is_autocast_enabled(device) and t.is_floating_point() and t.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return t.dtype


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
    """`_forward_loop` on grouped GEMMs, no host sync: the same outputs."""
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
    down: Tensor, g: Tensor, u: Tensor, input_grad: bool, weight_grads: bool,
    activation: str = "silu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_backward_loop` on grouped GEMMs, no host sync, deterministic."""
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


def _forward_loop(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor, keep: bool,
    activation: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """y [N, d] in slot order; with `keep`, also g, u [N, f] in expert order."""
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


def _backward_loop(
    dy: Tensor, x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor,
    down: Tensor, g: Tensor, u: Tensor, input_grad: bool, weight_grads: bool,
    activation: str = "silu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x and of the three weights; the ones not asked for come back empty."""
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


def kernel_op(name: str, kernel: Callable[..., Any], fake: Callable[..., Any],
              syncs: bool) -> CustomOpDef:
    """`moecompose::{name}`: a custom op running `kernel`, its output shapes from `fake`.

    An op whose kernel reads tensor values on the host (`syncs`: on CUDA a wait for the
    device, which a CUDA graph cannot capture) is tagged `cudagraph_unsafe`, so that
    Inductor's graph partitioning runs it outside the CUDA graphs of a compiled model
    (`mode="reduce-overhead"`) and captures the rest."""
    tags = (torch.Tag.cudagraph_unsafe,) if syncs else ()
    op = torch.library.custom_op(f"moecompose::{name}", kernel, mutates_args=(), tags=tags)
    op.register_fake(fake)
    return op


class ExpertOps(NamedTuple):
    """The ops of one expert kernel: the training forward (y, g, u), the inference forward
    (y) and the backward (dx, dgate, dup, ddown)."""

    forward: CustomOpDef
    inference: CustomOpDef
    backward: CustomOpDef


def _forward_fake(x, order, counts, gate, up, down, activation="silu"):
    N, f = order.shape[0], gate.shape[1]
    return x.new_empty(N, x.shape[1]), x.new_empty(N, f), x.new_empty(N, f)


def _inference_fake(x, order, counts, gate, up, down, activation="silu"):
    return x.new_empty(order.shape[0], x.shape[1])


def _backward_fake(dy, x, order, counts, gate, up, down, g, u, input_grad, weight_grads,
                   activation="silu"):
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    dws = (torch.empty_like(w) if weight_grads else w.new_empty(0) for w in (gate, up, down))
    return (dx, *dws)


def _setup_context(ctx, inputs, output) -> None:
    x, order, counts, gate, up, down, activation = inputs
    _, g, u = output
    ctx.save_for_backward(x, order, counts, gate, up, down, g, u)
    ctx.activation = activation


def _backward(backward_op, ctx, dy, _dg, _du):
    x, order, counts, gate, up, down, g, u = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    weight_grads = any(ctx.needs_input_grad[3:6])
    dx, dgate, dup, ddown = backward_op(
        dy, x, order, counts, gate, up, down, g, u, input_grad, weight_grads, ctx.activation
    )
    if not weight_grads:
        dgate = dup = ddown = None
    return dx if input_grad else None, None, None, dgate, dup, ddown, None


def _expert_ops(suffix: str, forward: Callable[..., Any], backward: Callable[..., Any],
                syncs: bool) -> ExpertOps:
    """`moecompose::grouped_swiglu{,_inference,_backward}{suffix}` on one kernel's
    forward and backward, with the same fake, autograd and autocast registrations."""

    def train(
        x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
        activation: str = "silu",
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, g, u = forward(x, order, counts, gate, up, down, True, activation)
        assert g is not None and u is not None
        return y, g, u

    def inference(
        x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
        activation: str = "silu",
    ) -> Tensor:
        return forward(x, order, counts, gate, up, down, False, activation)[0]

    names = [f"grouped_swiglu{part}{suffix}" for part in ("", "_inference", "_backward")]
    ops = ExpertOps(
        kernel_op(names[0], train, _forward_fake, syncs),
        kernel_op(names[1], inference, _inference_fake, syncs),
        kernel_op(names[2], backward, _backward_fake, syncs),
    )
    ops.forward.register_autograd(partial(_backward, ops.backward), setup_context=_setup_context)
    for name, cast in zip(names, (True, True, False), strict=True):
        autocast_rule(name, cast)
    return ops


LOOP_OPS = _expert_ops("", _forward_loop, _backward_loop, syncs=True)  # counts.tolist()
GROUPED_MM_OPS = _expert_ops("_gmm", _forward_grouped_mm, _backward_grouped_mm, syncs=False)


def grouped_swiglu(
    x: Tensor, order: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor,
    activation: str = "silu",
) -> Tensor:
    """x [T, d], order [T*k], counts [E] -> every slot's expert output [T*k, d], slot order;
    `activation`: the gate's, "silu" (SwiGLU) or "gelu_tanh" (GeGLU).

    Without autograd (inference, frozen experts and input) the gate/up activations are
    not kept, so every temporary is expert-sized.
    """
    ops = GROUPED_MM_OPS if uses_grouped_mm(x, gate, up, down) else LOOP_OPS
    needs_grad = any(t.requires_grad for t in (x, gate, up, down))
    if torch.is_grad_enabled() and needs_grad:
        return ops.forward(x, order, counts, gate, up, down, activation)[0]
    return ops.inference(x, order, counts, gate, up, down, activation)
