"""Mixture of attention (BAM, Zhang et al. 2024): E attention experts mixed by a router.

`y = sum_j a[:, j] * o_j(attn(q_j(x), k_j(x), v_j(x)))` with `a = softmax(x @ router.T)`
(fp32) over all E experts; a top-k router keeps the k largest weights (renormalised if
configured) and zeroes the rest. Every expert runs whatever its weight.

Tensor names follow `docs/artifact-format.md`: `router.weight` [E, d];
`experts.q_proj` [E, h*dh, d], `experts.o_proj` [E, d, h*dh]; expert-KV adds
`experts.{k,v}_proj` [E, kv*dh, d]; shared-KV has one `k_proj`, `v_proj` (nn.Linear);
with q/k/v biases, `experts.{q,k,v}_bias` [E, h*dh] / [E, kv*dh] (k/v: expert-KV only)
and `{k,v}_proj.bias` (shared-KV).

Two implementations, same numbers: `impl="fused"` projects all experts' queries (and
keys, values) with one GEMM each over the stacked weights, rotates once over [B, E*h, S,
dh], runs one `scaled_dot_product_attention` over experts x heads and folds the router
weights into one output GEMM over [B, S, E*h*dh]; `impl="loop"` is the reference, one
ordinary attention per expert, summed with the router weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.cache import LayerKV
from moecompose.model.config import MoAAttentionConfig
from moecompose.model.moe import expert_slices, one_of, stacked_parameter
from moecompose.model.parts import Mask, apply_rotary, attend, merge_heads, split_heads
from moecompose.model.routing import Routing, make_router

AttentionImpl = Literal["fused", "loop"]
ATTENTION_IMPLS: tuple[AttentionImpl, ...] = ("fused", "loop")


class AttentionExperts(nn.Module):
    """Stacked projections of E attention experts (k, v only for expert-KV)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        shared_kv: bool,
        bias: bool,
    ) -> None:
        super().__init__()
        E, q_out, kv_out = num_experts, n_heads * head_dim, n_kv_heads * head_dim
        self.q_proj = stacked_parameter(E, q_out, dim)
        self.k_proj = None if shared_kv else stacked_parameter(E, kv_out, dim)
        self.v_proj = None if shared_kv else stacked_parameter(E, kv_out, dim)
        self.o_proj = stacked_parameter(E, dim, q_out)
        with_kv_bias = bias and not shared_kv
        self.q_bias = stacked_parameter(E, q_out, fan_in=dim) if bias else None
        self.k_bias = stacked_parameter(E, kv_out, fan_in=dim) if with_kv_bias else None
        self.v_bias = stacked_parameter(E, kv_out, fan_in=dim) if with_kv_bias else None


def _flat(t: Tensor | None) -> Tensor | None:
    """Stacked [E, n, ...] -> [E*n, ...]: all experts as one projection."""
    return None if t is None else t.flatten(0, 1)


class MixtureOfAttention(nn.Module):
    """E causal grouped-query attention experts with rotary positions, mixed by a router.

    Shared-KV: one k, v projection (and one cache entry [B, kv, L, dh]) for all experts;
    expert-KV: a cache entry [B, E*kv, L, dh].
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        spec: MoAAttentionConfig,
        bias: bool = False,
        impl: AttentionImpl = "fused",
        scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        """`scale`, `softcap`: of every expert's scores, as in `attend` (Gemma 2)."""
        super().__init__()
        one_of("impl", impl, ATTENTION_IMPLS)
        self.impl = impl
        self.scale = scale
        self.softcap = softcap
        self.num_experts = spec.num_experts
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.shared_kv = spec.shared_kv
        self.router = make_router(dim, spec.num_experts, spec.router)
        self.experts = AttentionExperts(
            spec.num_experts, dim, n_heads, n_kv_heads, head_dim, spec.shared_kv, bias
        )
        kv_out = n_kv_heads * head_dim
        self.k_proj = nn.Linear(dim, kv_out, bias=bias) if spec.shared_kv else None
        self.v_proj = nn.Linear(dim, kv_out, bias=bias) if spec.shared_kv else None

    @property
    def cached_kv_heads(self) -> int:
        """Key (and value) heads a KV cache holds per token."""
        return self.n_kv_heads if self.shared_kv else self.num_experts * self.n_kv_heads

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        """Called as `Attention.forward`: x [B, S, d] -> [B, S, d]."""
        weights = self.mixture_weights(x).to(x.dtype)  # [B, S, E]
        if self.impl == "loop":
            return self._loop(x, weights, cos, sin, mask, cache)
        return self._fused(x, weights, cos, sin, mask, cache)

    def mixture_weights(self, x: Tensor) -> Tensor:
        """x [..., d] -> each expert's weight [..., E] (fp32): the soft router's, or the
        top-k router's kept weights and 0 for the other experts."""
        routing = self.router(x)
        return routing.dense() if isinstance(routing, Routing) else routing

    def _fused(self, x: Tensor, weights: Tensor, cos: Tensor, sin: Tensor,
               mask: Mask, cache: LayerKV | None) -> Tensor:
        B, S, d = x.shape
        E, h, kv, dh = self.num_experts, self.n_heads, self.n_kv_heads, self.head_dim
        ex = self.experts
        q = F.linear(x, _flat(ex.q_proj), _flat(ex.q_bias))  # [B, S, E*h*dh]
        if self.shared_kv:
            assert self.k_proj is not None and self.v_proj is not None
            k = split_heads(self.k_proj(x), kv)  # [B, kv, S, dh]
            v = split_heads(self.v_proj(x), kv)
            # Query heads ordered (kv head, expert, head in group g = h/kv) so that
            # grouped-query attention maps every expert's group to the one shared kv head.
            q = q.view(B, S, E, kv, -1).transpose(2, 3).reshape(B, S, E * h, dh)  # a copy
        else:
            assert ex.k_proj is not None and ex.v_proj is not None
            k = split_heads(F.linear(x, _flat(ex.k_proj), _flat(ex.k_bias)), E * kv)
            v = split_heads(F.linear(x, _flat(ex.v_proj), _flat(ex.v_bias)), E * kv)
            q = q.view(B, S, E * h, dh)  # expert e's heads read e's kv heads
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, E*h, S, dh]
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, E*kv or kv, L, dh]
        o = attend(q, k, v, mask, self.scale, self.softcap)
        o = o.transpose(1, 2)  # [B, S, E*h, dh], heads in q's order
        # Router weights on the experts' outputs; the weighted sum over experts is then
        # part of one output GEMM over [B, S, E*h*dh], its weight's columns in o's order.
        if self.shared_kv:
            o = o.reshape(B, S, kv, E, -1) * weights[:, :, None, :, None]  # [B, S, kv, E, g*dh]
            o_proj = ex.o_proj.view(E, d, kv, -1).permute(1, 2, 0, 3)  # [d, kv, E, g*dh]
        else:
            o = o.reshape(B, S, E, h * dh) * weights[..., None]  # [B, S, E, h*dh]
            o_proj = ex.o_proj.transpose(0, 1)  # [d, E, h*dh]
        return F.linear(o.flatten(2), o_proj.reshape(d, E * h * dh))

    def _loop(self, x: Tensor, weights: Tensor, cos: Tensor, sin: Tensor,
              mask: Mask, cache: LayerKV | None) -> Tensor:
        E, h, kv = self.num_experts, self.n_heads, self.n_kv_heads
        ex = self.experts
        experts = expert_slices(
            ex.q_proj, ex.q_bias, ex.o_proj, ex.k_proj, ex.k_bias, ex.v_proj, ex.v_bias
        )
        if self.shared_kv:
            assert self.k_proj is not None and self.v_proj is not None
            k = apply_rotary(split_heads(self.k_proj(x), kv), cos, sin)  # [B, kv, S, dh]
            v = split_heads(self.v_proj(x), kv)
            if cache is not None:
                k, v = cache.update(k, v)
            keys, values = [k] * E, [v] * E
        else:
            assert ex.k_proj is not None and ex.v_proj is not None
            keys, values = [], []
            for *_, k_proj, k_bias, v_proj, v_bias in experts:
                k = F.linear(x, k_proj, k_bias)
                keys.append(apply_rotary(split_heads(k, kv), cos, sin))  # [B, kv, S, dh]
                values.append(split_heads(F.linear(x, v_proj, v_bias), kv))
            if cache is not None:
                k, v = cache.update(torch.cat(keys, dim=1), torch.cat(values, dim=1))
                keys, values = list(k.chunk(E, dim=1)), list(v.chunk(E, dim=1))
        y = torch.zeros_like(x)
        for e, (q_proj, q_bias, o_proj, *_) in enumerate(experts):
            q = split_heads(F.linear(x, q_proj, q_bias), h)  # [B, h, S, dh]
            o = attend(apply_rotary(q, cos, sin), keys[e], values[e], mask, self.scale,
                       self.softcap)
            y = y + weights[..., e, None] * F.linear(merge_heads(o), o_proj)
        return y
