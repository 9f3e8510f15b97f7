"""Adapter experts (PESC, Wu et al. 2024): one shared FFN, experts are bottleneck adapters.

Shapes: `T` tokens, `d` model width, `E` experts, `r` adapter bottleneck, `k` experts per
token, `N = T * k` token slots. Tensor names follow `docs/artifact-format.md`:
`{gate,up,down}_proj.weight` (the shared SwiGLU, named as in a dense layer),
`router.weight` [E, d], `adapters.down_proj` [E, r, d], `adapters.up_proj` [E, d, r].

    u = ffn(x)
    w, idx = topk(softmax(x @ router.weight.T), k)          (renormalised if normalize)
    y = u + sum_j w_j * scale * up_{idx_j}(act(dropout(down_{idx_j}(u))))

Dispatch mirrors `GroupedExperts`: the N slots are sorted by expert and each projection is
one `moecompose::grouped_linear` op (a GEMM per expert over its contiguous rows, counts
read inside the op, so `torch.compile` sees one node with a static output shape). Dropout
and the activation run between the two ops as ordinary traced code. With bf16 on CUDA the
op is `moecompose::grouped_linear_gmm` instead, one `torch._grouped_mm` without a host
sync, which CUDA graphs may capture; the loop's op reads the counts on the host and is
tagged `cudagraph_unsafe` (see `grouped_swiglu`). The adapters' outputs are combined in
slot order, a sum over each token's k slots, deterministically. Under autocast the op runs
like `mm`, in the autocast dtype (`autocast_rule`); the router stays fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import CustomOpDef

from moecompose.model.config import AdapterActivation, AdapterFFNConfig, FFNActivation
from moecompose.model.grouped_swiglu import (
    _gmm,
    _offsets,
    _spans,
    autocast_rule,
    kernel_op,
    uses_grouped_mm,
)
from moecompose.model.moe import DISPATCHES, Dispatch, expert_loop, one_of, stacked_parameter
from moecompose.model.parts import swiglu
from moecompose.model.routing import TopKRouter, expert_counts, weighted_aux_loss

ACTIVATIONS: dict[AdapterActivation, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as torch.nn.GELU()
    "relu": F.relu,
    "silu": F.silu,
}

# --------------------------------------------------------------------------- grouped linear


def _linear_loop(x: Tensor, counts: Tensor, weight: Tensor) -> Tensor:
    y = x.new_empty(x.shape[0], weight.shape[1])
    for e, s, t in _spans(counts):
        torch.mm(x[s:t], weight[e].t(), out=y[s:t])
    return y


def _linear_grouped_mm(x: Tensor, counts: Tensor, weight: Tensor) -> Tensor:
    return _gmm(x, weight.transpose(1, 2), _offsets(counts))


def _linear_backward_loop(
    dy: Tensor, x: Tensor, counts: Tensor, weight: Tensor, input_grad: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of x [N, in] and weight [E, out, in]; the ones not asked for come back empty."""
    dx = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    dw = torch.zeros_like(weight) if weight_grad else weight.new_empty(0)
    for e, s, t in _spans(counts):
        if input_grad:
            torch.mm(dy[s:t], weight[e], out=dx[s:t])  # [n, in]
        if weight_grad:
            torch.mm(dy[s:t].t(), x[s:t], out=dw[e])  # [out, in]
    return dx, dw


def _linear_backward_grouped_mm(
    dy: Tensor, x: Tensor, counts: Tensor, weight: Tensor, input_grad: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    dy = dy.contiguous()  # a gradient may come broadcast (stride 0), which _grouped_mm refuses
    offsets = _offsets(counts)
    return (_gmm(dy, weight, offsets) if input_grad else x.new_empty(0),
            _gmm(dy.t(), x, offsets) if weight_grad else weight.new_empty(0))


def _linear_fake(x, counts, weight):
    return x.new_empty(x.shape[0], weight.shape[1])


def _linear_backward_fake(dy, x, counts, weight, input_grad, weight_grad):
    dx = torch.empty_like(x) if input_grad else x.new_empty(0)
    dw = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(backward_op, ctx, dy):
    x, counts, weight = ctx.saved_tensors
    input_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dx, dw = backward_op(dy, x, counts, weight, input_grad, weight_grad)
    return dx if input_grad else None, None, dw if weight_grad else None


class LinearOps(NamedTuple):
    """The ops of one grouped-linear kernel: forward and backward."""

    forward: CustomOpDef
    backward: CustomOpDef


def _linear_ops(suffix: str, forward: Callable[..., Tensor],
                backward: Callable[..., tuple[Tensor, Tensor]], syncs: bool) -> LinearOps:
    """`moecompose::grouped_linear{,_backward}{suffix}` on one kernel, with the same fake,
    autograd and autocast registrations."""
    names = (f"grouped_linear{suffix}", f"grouped_linear_backward{suffix}")
    ops = LinearOps(kernel_op(names[0], forward, _linear_fake, syncs),
                    kernel_op(names[1], backward, _linear_backward_fake, syncs))
    ops.forward.register_autograd(partial(_backward, ops.backward), setup_context=_setup_context)
    autocast_rule(names[0], cast=True)
    autocast_rule(names[1], cast=False)
    return ops


LINEAR_LOOP_OPS = _linear_ops("", _linear_loop, _linear_backward_loop, syncs=True)
LINEAR_GROUPED_MM_OPS = _linear_ops("_gmm", _linear_grouped_mm, _linear_backward_grouped_mm,
                                    syncs=False)


def grouped_linear(x: Tensor, counts: Tensor, weight: Tensor) -> Tensor:
    """Rows sorted by expert: x [N, in], counts [E] (rows per expert, summing to N),
    weight [E, out, in] -> [N, out], where rows of expert e are multiplied by `weight[e].T`.
    bf16 on CUDA: one grouped GEMM, no host sync (`uses_grouped_mm`)."""
    ops = LINEAR_GROUPED_MM_OPS if uses_grouped_mm(x, weight) else LINEAR_LOOP_OPS
    return ops.forward(x, counts, weight)


# --------------------------------------------------------------------------- adapters


class GroupedAdapters(nn.Module):
    """E bottleneck adapters `scale * up_e(act(dropout(down_e(u))))` with stacked weights.

    `dispatch="grouped"` sorts token slots by expert and runs two `grouped_linear` ops;
    `dispatch="loop"` is the reference, `expert_loop`. `up_proj` starts at zero, so a
    fresh layer adds nothing.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        bottleneck: int,
        scale: float,
        activation: AdapterActivation,
        dropout: float,
        dispatch: Dispatch = "grouped",
    ) -> None:
        super().__init__()
        one_of("dispatch", dispatch, DISPATCHES)
        self.scale = scale
        self.activation = activation
        self.dropout = dropout
        self.dispatch = dispatch
        self.down_proj = stacked_parameter(num_experts, bottleneck, dim)
        self.up_proj = nn.Parameter(torch.zeros(num_experts, dim, bottleneck))

    def _hidden(self, h: Tensor) -> Tensor:
        return ACTIVATIONS[self.activation](F.dropout(h, self.dropout, self.training))

    def _adapter(self, u: Tensor, down: Tensor, up: Tensor) -> Tensor:
        """One adapter, unscaled: u [n, d], down [r, d], up [d, r] -> [n, d]."""
        return F.linear(self._hidden(F.linear(u, down)), up)

    def forward(self, u: Tensor, weights: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
        """u [T, d], weights [T, k] (u's dtype), indices [T, k], counts [E] ->
        `sum_j weights[:, j] * adapter_{indices[:, j]}(u)` [T, d]."""
        if self.dispatch == "loop":
            stacked = (self.down_proj, self.up_proj)
            return expert_loop(u, weights * self.scale, indices, stacked, self._adapter)
        T, k = indices.shape
        order = indices.reshape(-1).argsort(stable=True)  # [N] slots sorted by expert
        h = grouped_linear(u.index_select(0, order // k), counts, self.down_proj)  # [N, r]
        a = grouped_linear(self._hidden(h), counts, self.up_proj)  # [N, d], expert order
        # back to slot order (a permutation), then each token's k slots summed in order:
        # deterministic, where adding rows into tokens (`index_add`) is not on CUDA
        slots = torch.empty_like(a).index_copy_(0, order, a).view(T, k, -1)  # [T, k, d]
        return (slots * weights[..., None]).sum(dim=1) * self.scale


class AdapterMoEFFN(nn.Module):
    """PESC layer: the shared SwiGLU FFN (gate `activation`: the model's FFN's), a top-k
    router on its input, adapter experts (with their own `spec.activation`) on its output.
    forward returns the output and the layer's weighted auxiliary loss (load balance and
    z-loss of the router, as in `MoEFFN`)."""

    def __init__(self, dim: int, spec: AdapterFFNConfig, dispatch: Dispatch = "grouped",
                 activation: FFNActivation = "silu") -> None:
        super().__init__()
        self.activation = activation
        self.num_experts = spec.num_experts
        self.lb_coef = spec.aux_loss.load_balance
        self.z_coef = spec.aux_loss.z_loss
        self.gate_proj = nn.Linear(dim, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, dim, bias=False)
        self.router = TopKRouter(dim, spec.num_experts, spec.router)
        self.adapters = GroupedAdapters(
            spec.num_experts,
            dim,
            spec.bottleneck,
            spec.scale,
            spec.activation,
            spec.dropout,
            dispatch,
        )

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [..., d], tokens [...] (bool, False = padding: left out of the aux loss) ->
        (y [..., d], aux loss [])."""
        u = swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                   self.activation)
        shape = x.shape
        x, u = x.reshape(-1, shape[-1]), u.reshape(-1, shape[-1])  # [T, d]
        weights, indices, logits = self.router(x)  # [T, k], [T, k], [T, E]
        counts = expert_counts(indices, self.num_experts)  # [E]
        y = u + self.adapters(u, weights.to(u.dtype), indices, counts)
        if tokens is not None:
            tokens = tokens.reshape(-1)  # [T]
            counts = expert_counts(indices, self.num_experts, tokens)  # real tokens' only
        aux = weighted_aux_loss(logits, counts, self.lb_coef, self.z_coef, tokens)
        return y.reshape(shape), aux
