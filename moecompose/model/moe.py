"""Mixture-of-Experts FFN: a router, grouped experts, an optional shared expert.

Shapes: `T` tokens, `d` model width, `E` experts, `f` expert width, `k` experts per token.
The tensor names follow `docs/artifact-format.md`: `router.weight` [E, d],
`experts.{gate,up}_proj` [E, f, d], `experts.down_proj` [E, d, f],
`shared_expert.{gate,up,down}_proj.weight`, `shared_expert_gate.weight` [1, d].
The router is a top-k or a Nexus router (`moecompose/model/routing.py`; Nexus replaces
`router.weight` with its projection).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.config import FFNActivation, MoEFFNConfig
from moecompose.model.grouped_swiglu import grouped_swiglu
from moecompose.model.parts import SwiGLU, swiglu
from moecompose.model.routing import expert_counts, make_router, weighted_aux_loss

Dispatch = Literal["grouped", "loop"]
DISPATCHES: tuple[Dispatch, ...] = ("grouped", "loop")


def one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise `ValueError` unless `value` (of the argument `name`) is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def stacked_parameter(*shape: int, fan_in: int | None = None) -> nn.Parameter:
    """A stacked weight [E, ...] (or bias) with nn.Linear's initialisation: uniform in
    `+-1/sqrt(fan_in)`, `fan_in` the last dimension unless given."""
    bound = 1 / math.sqrt(shape[-1] if fan_in is None else fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def expert_slices(*stacked: Tensor | None) -> list[tuple[Any, ...]]:
    """Each expert's views of stacked [E, ...] tensors: entry e is `(t[e] for t in stacked)`
    (None stays None).

    One `unbind` per tensor, whose backward stacks the E gradients into one [E, ...]
    tensor; indexing `t[e]` for every e instead gives each slice's backward a zero-filled
    gradient of the whole stack, E times the work and memory of the weights."""
    count = next(t.shape[0] for t in stacked if t is not None)
    columns = [[None] * count if t is None else t.unbind(0) for t in stacked]
    return list(zip(*columns, strict=True))


def expert_loop(
    x: Tensor,
    weights: Tensor,
    indices: Tensor,
    stacked: tuple[Tensor, ...],
    expert: Callable[..., Tensor],
) -> Tensor:
    """The reference dispatch, Hugging Face's Mixtral loop over experts with `one_hot` /
    `where` (data-dependent shapes, so it breaks compiled graphs): x [T, d], weights [T, k]
    (x's dtype), indices [T, k], stacked expert weights [E, ...] ->
    `sum_j weights[:, j] * expert(x, *stacked[indices[:, j]])` [T, d]."""
    out = torch.zeros_like(x)  # [T, d]
    mask = F.one_hot(indices, stacked[0].shape[0]).permute(2, 1, 0)  # [E, k, T]
    for e, params in enumerate(expert_slices(*stacked)):
        slot, token = torch.where(mask[e])
        out.index_add_(0, token, expert(x[token], *params) * weights[token, slot, None])
    return out


class GroupedExperts(nn.Module):
    """E SwiGLU experts (GeGLU with `activation="gelu_tanh"`) with stacked weights, applied
    to each token's k chosen experts.

    `dispatch="grouped"` sorts the T*k token slots by expert and runs one grouped GEMM op
    (`grouped_swiglu`); it traces into a single graph with `torch.compile`.
    `dispatch="loop"` is the reference, `expert_loop`.
    """

    def __init__(
        self, num_experts: int, dim: int, hidden: int, dispatch: Dispatch = "grouped",
        activation: FFNActivation = "silu",
    ) -> None:
        super().__init__()
        one_of("dispatch", dispatch, DISPATCHES)
        self.dispatch = dispatch
        self.activation = activation
        self.gate_proj = stacked_parameter(num_experts, hidden, dim)
        self.up_proj = stacked_parameter(num_experts, hidden, dim)
        self.down_proj = stacked_parameter(num_experts, dim, hidden)

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
        """x [T, d], weights [T, k] (x's dtype), indices [T, k], counts [E] -> [T, d]."""
        stacked = (self.gate_proj, self.up_proj, self.down_proj)
        if self.dispatch == "loop":
            expert = partial(swiglu, activation=self.activation)
            return expert_loop(x, weights, indices, stacked, expert)
        T, k = indices.shape
        order = indices.reshape(-1).argsort(stable=True)  # [T*k] slots sorted by expert
        y = grouped_swiglu(x, order, counts, *stacked, self.activation)
        return (y.view(T, k, -1) * weights[..., None]).sum(dim=1)  # [T, k, d] -> [T, d]


class MoEFFN(nn.Module):
    """Routed experts plus an optional shared expert, `sigmoid`-gated when configured.

    forward returns the output and this layer's weighted auxiliary loss
    (`load_balance * L_lb + z_loss * L_z`, a fp32 scalar, zero when both are off).
    """

    def __init__(self, dim: int, spec: MoEFFNConfig, dispatch: Dispatch = "grouped",
                 activation: FFNActivation = "silu") -> None:
        """`activation`: the gate activation of the experts and the shared expert."""
        super().__init__()
        self.num_experts = spec.num_experts
        self.lb_coef = spec.aux_loss.load_balance
        self.z_coef = spec.aux_loss.z_loss
        self.router = make_router(dim, spec.num_experts, spec.router)
        self.experts = GroupedExperts(spec.num_experts, dim, spec.intermediate_size, dispatch,
                                      activation)
        shared = spec.shared_expert
        self.shared_expert = (None if shared is None
                              else SwiGLU(dim, shared.intermediate_size, activation))
        self.shared_expert_gate = (
            nn.Linear(dim, 1, bias=False) if shared is not None and shared.gate else None
        )

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [..., d], tokens [...] (bool, False = padding: left out of the aux loss) ->
        (y [..., d], aux loss [])."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, d]
        weights, indices, logits = self.router(x)  # [T, k], [T, k], [T, E]
        counts = expert_counts(indices, self.num_experts)  # [E]
        y = self.experts(x, weights.to(x.dtype), indices, counts)  # [T, d]
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))  # [T, d] * [T, 1]
            y = y + shared
        if tokens is not None:
            tokens = tokens.reshape(-1)  # [T]
            counts = expert_counts(indices, self.num_experts, tokens)  # real tokens' only
        aux = weighted_aux_loss(logits, counts, self.lb_coef, self.z_coef, tokens)
        return y.reshape(shape), aux
