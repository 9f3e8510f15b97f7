"""Routers: which experts see a token, and with what weight; and the routers' aux losses.

Shapes: `T` tokens (`...` where any leading dimensions do), `d` model width, `E` experts,
`k` experts per token. Every router scores a token against one row per expert,
`logits = x @ rows.T` in fp32 (`router_logits`); they differ in where the rows come from
and what is made of the scores:

| router (config `kind`) | rows | output |
|---|---|---|
| `TopKRouter` (`topk`) | `weight` [E, d] | `Routing`: top k of softmax over all E |
| `SoftRouter` (`soft`) | `weight` [E, d] | softmax over all E, [..., E] |
| `NexusRouter` (`nexus`) | projected from domain embeddings | `Routing`, as top-k |
| `TokenMixingRouter` (`token_mixing`) | `weight` [E, d] | softmax over a group of tokens |

`make_router` builds the one a config names. Aux losses (`weighted_aux_loss`) are those of
a token-choice router: Switch load balance and ST-MoE z-loss, from logits and
`expert_counts`.

Mixed precision: routers compute in fp32 under `torch.autocast` too. The logits, the Nexus
projection and the aux losses run with autocast off (on the input's device type), since
autocast would run their matmuls in its lower precision; softmax and top-k then see fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.config import (
    NexusRouterConfig,
    RouterConfig,
    SoftRouterConfig,
    TokenMixingRouterConfig,
    TopKRouterConfig,
)


class Routing(NamedTuple):
    """weights [..., k] (fp32), indices [..., k] (int64), logits [..., E] (fp32)."""

    weights: Tensor
    indices: Tensor
    logits: Tensor

    def dense(self) -> Tensor:
        """Weights of all E experts [..., E]: the kept ones, 0 for the others."""
        return torch.zeros_like(self.logits).scatter(-1, self.indices, self.weights)


def router_logits(x: Tensor, rows: Tensor) -> Tensor:
    """x [..., d], one row per expert rows [E, d] -> logits [..., E], computed in fp32
    (autocast off)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), rows.float())


def top_k_routing(logits: Tensor, k: int, normalize: bool) -> Routing:
    """Softmax of logits [..., E] over all experts, keep the top k, optionally renormalise
    the kept probabilities to sum to 1."""
    probs = logits.softmax(dim=-1)
    weights, indices = probs.topk(k, dim=-1)  # [..., k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, indices, logits)


def soft_routing(logits: Tensor) -> Tensor:
    """Every expert weighted by its probability: softmax of logits [..., E] over all E."""
    return logits.softmax(dim=-1)


class LinearRouter(nn.Module):
    """A router whose rows are a parameter `weight` [E, d] (nn.Linear's initialisation)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def logits(self, x: Tensor) -> Tensor:
        """x [..., d] -> [..., E] (fp32)."""
        return router_logits(x, self.weight)


class TopKRouter(LinearRouter):
    """Token choice (Mixtral, Switch, PESC): softmax over all E experts, keep the top k,
    renormalised over them when `normalize`."""

    def __init__(self, dim: int, num_experts: int, config: TopKRouterConfig) -> None:
        super().__init__(dim, num_experts)
        self.k = config.k
        self.normalize = config.normalize

    def forward(self, x: Tensor) -> Routing:
        """x [..., d] -> Routing."""
        return top_k_routing(self.logits(x), self.k, self.normalize)


class SoftRouter(LinearRouter):
    """Every expert runs, weighted by `softmax(x @ weight.T)` (BAM's attention experts)."""

    def __init__(self, dim: int, num_experts: int, config: SoftRouterConfig) -> None:
        super().__init__(dim, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d] -> weights [..., E] (fp32)."""
        return soft_routing(self.logits(x))


class TokenMixingRouter(LinearRouter):
    """The controller of Mixture of Tokens (Antoniak et al. 2023): `weight` [E, d] and the
    temperature T, a parameter `temperature` [] when learned, else the config's constant.
    For each expert, a softmax over the G tokens of a group of `x @ weight.T / T`."""

    def __init__(self, dim: int, num_experts: int, config: TokenMixingRouterConfig) -> None:
        super().__init__(dim, num_experts)
        self.group_size = config.group_size
        self.temperature: nn.Parameter | float = (
            nn.Parameter(torch.tensor(config.temperature))
            if config.learn_temperature
            else config.temperature
        )

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """x [M, G, d] (M groups of G tokens), real [M, G] (False = padding row) -> mixing
        weights [M, G, E], fp32, summing to 1 over G for every group and expert."""
        logits = self.logits(x) / self.temperature  # [M, G, E]
        logits = logits.masked_fill(~real[:, :, None], float("-inf"))
        return logits.softmax(dim=1)


class NexusRouter(nn.Module):
    """Nexus (Gritsch et al. 2024): top-k routing over `softmax(x @ e.T)`, the expert
    embeddings `e` projected from frozen domain embeddings (`m` wide) by a small network:

        z = domain_embeddings @ w1.weight.T            # [E, 2d]
        e = (silu(z[:, :d]) * z[:, d:]) @ w2.weight.T  # [E, d]

    Tensors: `domain_embeddings` [E, m] (a buffer: saved, never trained), `w1.weight`
    [2d, m], `w2.weight` [d, d]. Initialisation (the paper gives none): `w1` normal, mean
    0, std `1/sqrt(m)`, so `z` has unit variance when the domain embeddings have unit RMS;
    `w2` normal, mean 0, std `1/d`, so logits are of order 1 for unit-RMS tokens whatever
    the width (std `1/sqrt(d)` would make them grow like `sqrt(d)` and the initial routing
    one-hot); domain embeddings zero until loaded (all experts then score 0).

    `e` does not depend on the input. In training mode it is computed once per forward;
    in eval mode it is computed when the module switches to eval, after `load_state_dict`
    and on `refresh()`, and forward reads that cached copy (so in eval mode no gradient
    reaches `w1`, `w2`). Writing the weights in place in eval mode (an optimiser step,
    `copy_`) leaves the cache stale until `refresh()`. The projection runs in the
    parameters' dtype (the domain embeddings are cast to it; autocast off, so fp32
    weights project in fp32 under mixed precision too); the logits are fp32.
    """

    def __init__(self, dim: int, num_experts: int, config: NexusRouterConfig) -> None:
        super().__init__()
        self.dim = dim
        self.k = config.k
        self.normalize = config.normalize
        self.register_buffer("domain_embeddings", torch.zeros(num_experts, config.domain_dim))
        self.w1 = nn.Linear(config.domain_dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.w1.weight, std=1 / math.sqrt(config.domain_dim))
        nn.init.normal_(self.w2.weight, std=1 / dim)
        self.register_buffer("expert_embeddings", torch.zeros(num_experts, dim), persistent=False)
        self.register_load_state_dict_post_hook(NexusRouter._after_load)

    def project(self) -> Tensor:
        """Expert embeddings [E, d] (fp32) from the domain embeddings."""
        with torch.autocast(self.w1.weight.device.type, enabled=False):
            dom = self.domain_embeddings.to(self.w1.weight.dtype)  # [E, m]
            a, b = self.w1(dom).split(self.dim, dim=-1)  # [E, d] each
            return self.w2(F.silu(a) * b).float()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the expert embeddings eval mode reads (allocating them first when the
        module was made on the meta device and its weights assigned afterwards)."""
        e = self.project()  # [E, d]
        if self.expert_embeddings.device != e.device:
            self.expert_embeddings = torch.empty_like(e)
        self.expert_embeddings.copy_(e)

    def train(self, mode: bool = True) -> NexusRouter:
        """Switching to eval mode fills the cache of expert embeddings."""
        super().train(mode)
        if not mode:
            self.refresh()
        return self

    def _after_load(self, incompatible_keys: object) -> None:
        if not self.training:
            self.refresh()

    def forward(self, x: Tensor) -> Routing:
        """x [..., d] -> Routing."""
        e = self.project() if self.training else self.expert_embeddings  # [E, d]
        return top_k_routing(router_logits(x, e), self.k, self.normalize)


_ROUTERS: dict[type[RouterConfig], Callable[[int, int, Any], nn.Module]] = {
    TopKRouterConfig: TopKRouter,
    SoftRouterConfig: SoftRouter,
    TokenMixingRouterConfig: TokenMixingRouter,
    NexusRouterConfig: NexusRouter,
}


def make_router(dim: int, num_experts: int, config: RouterConfig) -> nn.Module:
    """The router `config` describes, for `num_experts` experts and tokens of width `dim`."""
    return _ROUTERS[type(config)](dim, num_experts, config)


# --------------------------------------------------------------------------- aux losses


def expert_counts(indices: Tensor, num_experts: int, tokens: Tensor | None = None) -> Tensor:
    """Assignments per expert: indices [T, k] -> counts [E] (int64), with a static shape.
    With `tokens` [T] (bool, False = padding) only real tokens' assignments count."""
    flat = indices.reshape(-1)
    ones = torch.ones_like(flat) if tokens is None else tokens[:, None].expand_as(indices)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, ones.reshape(-1).to(flat.dtype))


def _token_mean(values: Tensor, tokens: Tensor | None) -> Tensor:
    """Mean over the first dimension of values [T, ...], over real tokens only when a
    mask tokens [T] (bool) is given (0 when there are none)."""
    if tokens is None:
        return values.mean(dim=0)
    keep = tokens.reshape(-1, *(1,) * (values.dim() - 1)).to(values.dtype)  # [T, 1, ...]
    return (values * keep).sum(dim=0) / keep.sum().clamp(min=1)


def load_balance_loss(logits: Tensor, counts: Tensor, tokens: Tensor | None = None) -> Tensor:
    """Switch Transformer balance loss `E * sum_i f_i * P_i`.

    `f_i` is the fraction of token-to-expert assignments that went to expert i (from
    `counts` [E], not differentiable), `P_i` the mean router probability of i over the
    T tokens (logits [T, E]), or over the real ones of `tokens` [T] (bool, False =
    padding; `counts` must then count only those too). Equals 1 under perfectly uniform
    routing.
    """
    E = logits.shape[-1]
    fraction = counts.float() / counts.sum().clamp(min=1)  # [E]
    mean_prob = _token_mean(logits.softmax(dim=-1), tokens)  # [E]
    return E * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor, tokens: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss `mean_t logsumexp(logits_t)^2`; logits [T, E], the mean over
    the real tokens of `tokens` [T] (bool) when given."""
    return _token_mean(torch.logsumexp(logits, dim=-1).square(), tokens)


def weighted_aux_loss(
    logits: Tensor,
    counts: Tensor,
    load_balance: float,
    z_loss: float,
    tokens: Tensor | None = None,
) -> Tensor:
    """`load_balance * L_lb + z_loss * L_z` (fp32 []; zero when both coefficients are 0),
    over the real tokens of `tokens` [T] (bool, False = padding) when given; `counts`
    must then be `expert_counts(indices, E, tokens)`. Autocast off."""
    with torch.autocast(logits.device.type, enabled=False):
        loss = logits.new_zeros(())
        if load_balance:
            loss = loss + load_balance * load_balance_loss(logits, counts, tokens)
        if z_loss:
            loss = loss + z_loss * router_z_loss(logits, tokens)
        return loss
