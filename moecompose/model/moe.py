"""Mixture-of-Experts FFN: router, grouped experts, shared expert, auxiliary losses.

Shapes: `T` tokens, `d` model width, `E` experts, `f` expert width, `k` experts per token.
The tensor names follow `docs/artifact-format.md`: `router.weight` [E, d],
`experts.{gate,up}_proj` [E, f, d], `experts.down_proj` [E, d, f],
`shared_expert.{gate,up,down}_proj.weight`, `shared_expert_gate.weight` [1, d].
A Nexus router (`moecompose/model/nexus.py`) replaces `router.weight` with its projection.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.config import (
    MoEFFNConfig,
    MoERouterConfig,
    NexusRouterConfig,
    TopKRouterConfig,
)
from moecompose.model.grouped_swiglu import grouped_swiglu
from moecompose.model.parts import SwiGLU

Dispatch = Literal["grouped", "loop"]
DISPATCHES: tuple[Dispatch, ...] = ("grouped", "loop")


class Routing(NamedTuple):
    """weights [T, k] (fp32), indices [T, k] (int64), logits [T, E] (fp32)."""

    weights: Tensor
    indices: Tensor
    logits: Tensor


def top_k_routing(logits: Tensor, k: int, normalize: bool) -> Routing:
    """Softmax of logits [T, E] (fp32) over all experts, keep the top k, optionally
    renormalise the kept probabilities to sum to 1."""
    probs = logits.softmax(dim=-1)
    weights, indices = probs.topk(k, dim=-1)  # [T, k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, indices, logits)


class TopKRouter(nn.Module):
    """Softmax over all E experts in fp32, keep the top k, optionally renormalise over them."""

    def __init__(self, dim: int, num_experts: int, k: int, normalize: bool = True) -> None:
        super().__init__()
        self.k = k
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Routing:
        """x: [T, d] -> Routing."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return top_k_routing(logits, self.k, self.normalize)


def make_router(dim: int, num_experts: int, spec: MoERouterConfig) -> nn.Module:
    """The router module of an MoE layer: top-k, or Nexus (a token-mixing controller is
    part of `TokenMixingFFN`)."""
    if isinstance(spec, NexusRouterConfig):
        from moecompose.model.nexus import NexusRouter  # nexus.py builds on this module

        return NexusRouter(dim, num_experts, spec)
    assert isinstance(spec, TopKRouterConfig)
    return TopKRouter(dim, num_experts, spec.k, spec.normalize)


def expert_counts(indices: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert: indices [T, k] -> counts [E] (int64), with a static shape."""
    flat = indices.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance_loss(logits: Tensor, counts: Tensor) -> Tensor:
    """Switch Transformer balance loss `E * sum_i f_i * P_i`.

    `f_i` is the fraction of token-to-expert assignments that went to expert i (from
    `counts` [E], not differentiable), `P_i` the mean router probability of i over the
    T tokens (logits [T, E]). Equals 1 under perfectly uniform routing.
    """
    E = logits.shape[-1]
    fraction = counts.float() / counts.sum().clamp(min=1)  # [E]
    mean_prob = logits.softmax(dim=-1).mean(dim=0)  # [E]
    return E * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2`; logits [T, E]."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def weighted_aux_loss(logits: Tensor, counts: Tensor, load_balance: float, z_loss: float) -> Tensor:
    """`load_balance * L_lb + z_loss * L_z` (fp32 []; zero when both coefficients are 0)."""
    loss = logits.new_zeros(())
    if load_balance:
        loss = loss + load_balance * load_balance_loss(logits, counts)
    if z_loss:
        loss = loss + z_loss * router_z_loss(logits)
    return loss


def expert_slices(*stacked: Tensor | None) -> list[tuple[Any, ...]]:
    """Each expert's views of stacked [E, ...] tensors: entry e is `(t[e] for t in stacked)`
    (None stays None).

    One `unbind` per tensor, whose backward stacks the E gradients into one [E, ...]
    tensor; indexing `t[e]` for every e instead gives each slice's backward a zero-filled
    gradient of the whole stack, E times the work and memory of the weights."""
    count = next(t.shape[0] for t in stacked if t is not None)
    columns = [[None] * count if t is None else t.unbind(0) for t in stacked]
    return list(zip(*columns, strict=True))


def swiglu_loop(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """One expert's SwiGLU: x [n, d], gate/up [f, d], down [d, f] -> [n, d]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, applied to each token's k chosen experts.

    `dispatch="grouped"` sorts the T*k token slots by expert and runs one grouped GEMM op
    (`grouped_swiglu`); it traces into a single graph with `torch.compile`.
    `dispatch="loop"` is the reference: Hugging Face's Mixtral loop over experts with
    `one_hot` / `where` (data-dependent shapes, so it breaks compiled graphs).
    """

    def __init__(
        self, num_experts: int, dim: int, hidden: int, dispatch: Dispatch = "grouped"
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.num_experts = num_experts
        self.dispatch = dispatch
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
        """x [T, d], weights [T, k] (x's dtype), indices [T, k], counts [E] -> [T, d]."""
        if self.dispatch == "loop":
            return self._loop(x, weights, indices)
        T, k = indices.shape
        order = indices.reshape(-1).argsort(stable=True)  # [T*k] slots sorted by expert
        y = grouped_swiglu(x, order, counts, self.gate_proj, self.up_proj, self.down_proj)
        return (y.view(T, k, -1) * weights[..., None]).sum(dim=1)  # [T, k, d] -> [T, d]

    def _loop(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        out = torch.zeros_like(x)  # [T, d]
        mask = F.one_hot(indices, self.num_experts).permute(2, 1, 0)  # [E, k, T]
        experts = expert_slices(self.gate_proj, self.up_proj, self.down_proj)
        for e, (gate, up, down) in enumerate(experts):
            slot, token = torch.where(mask[e])
            y = swiglu_loop(x[token], gate, up, down)
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


class MoEFFN(nn.Module):
    """Routed experts plus an optional shared expert, `sigmoid`-gated when configured.

    forward returns the output and this layer's weighted auxiliary loss
    (`load_balance * L_lb + z_loss * L_z`, a fp32 scalar, zero when both are off).
    """

    def __init__(self, dim: int, spec: MoEFFNConfig, dispatch: Dispatch = "grouped") -> None:
        super().__init__()
        self.num_experts = spec.num_experts
        self.lb_coef = spec.aux_loss.load_balance
        self.z_coef = spec.aux_loss.z_loss
        self.router = make_router(dim, spec.num_experts, spec.router)
        self.experts = GroupedExperts(spec.num_experts, dim, spec.intermediate_size, dispatch)
        shared = spec.shared_expert
        self.shared_expert = None if shared is None else SwiGLU(dim, shared.intermediate_size)
        self.shared_expert_gate = (
            nn.Linear(dim, 1, bias=False) if shared is not None and shared.gate else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., d] -> (y [..., d], aux loss [])."""
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
        return y.reshape(shape), self.aux_loss(logits, counts)

    def aux_loss(self, logits: Tensor, counts: Tensor) -> Tensor:
        return weighted_aux_loss(logits, counts, self.lb_coef, self.z_coef)
