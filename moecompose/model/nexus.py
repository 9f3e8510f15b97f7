"""Nexus router (Gritsch et al. 2024): expert embeddings projected from domain embeddings.

Shapes: `T` tokens, `d` model width, `E` routed experts, `m` domain-embedding width, `k`
experts per token. Each routed expert has a frozen domain embedding (the mean embedding
of its domain's documents); a small per-layer hypernetwork maps them to expert
embeddings, and tokens are routed by their similarity to those:

    z      = domain_embeddings @ w1.weight.T            # [E, 2d]
    e      = (silu(z[:, :d]) * z[:, d:]) @ w2.weight.T  # [E, d], the expert embeddings
    logits = x @ e.T                                    # [T, E], fp32
    w, idx = topk(softmax(logits), k)                   # [T, k], renormalised if normalize

The layer is an ordinary `MoEFFN` with this router: the seed FFN is its shared expert and
the domain experts' FFNs are the routed experts. Tensor names under `mlp.`:
`router.domain_embeddings` [E, m] (a buffer: saved, never trained), `router.w1.weight`
[2d, m], `router.w2.weight` [d, d].

Initialisation (the paper gives none): `w1` normal, mean 0, std `1/sqrt(m)`, so `z` has
unit variance when the domain embeddings have unit RMS; `w2` normal, mean 0, std `1/d`,
so router logits are of order 1 for unit-RMS tokens whatever the width (std `1/sqrt(d)`
would make them grow like `sqrt(d)` and the initial routing one-hot); domain embeddings
zero until loaded (all experts then score 0).

`e` does not depend on the input. In training mode it is computed once per forward; in
eval mode it is computed when the module switches to eval, after `load_state_dict` and
on `refresh()`, and forward reads that cached copy (so in eval mode no gradient reaches
`w1`, `w2`). Writing the weights in place in eval mode (an optimiser step, `copy_`)
leaves the cache stale until `refresh()`. The projection runs in the parameters' dtype
(the domain embeddings are cast to it); the logits are fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.config import NexusRouterConfig
from moecompose.model.moe import Routing, top_k_routing


class NexusRouter(nn.Module):
    """Top-k routing over `softmax(x @ e.T)` with `e` projected from domain embeddings."""

    def __init__(self, dim: int, num_experts: int, spec: NexusRouterConfig) -> None:
        super().__init__()
        self.dim = dim
        self.k = spec.k
        self.normalize = spec.normalize
        self.register_buffer("domain_embeddings", torch.zeros(num_experts, spec.domain_dim))
        self.w1 = nn.Linear(spec.domain_dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.w1.weight, std=1 / math.sqrt(spec.domain_dim))
        nn.init.normal_(self.w2.weight, std=1 / dim)
        self.register_buffer("expert_embeddings", torch.zeros(num_experts, dim), persistent=False)
        self.register_load_state_dict_post_hook(NexusRouter._after_load)

    def project(self) -> Tensor:
        """Expert embeddings [E, d] (fp32) from the domain embeddings."""
        dom = self.domain_embeddings.to(self.w1.weight.dtype)  # [E, m]
        a, b = self.w1(dom).split(self.dim, dim=-1)  # [E, d] each
        return self.w2(F.silu(a) * b).float()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the expert embeddings eval mode reads."""
        self.expert_embeddings.copy_(self.project())

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
        """x: [T, d] -> Routing."""
        e = self.project() if self.training else self.expert_embeddings  # [E, d]
        logits = F.linear(x.float(), e.float())  # [T, E]
        return top_k_routing(logits, self.k, self.normalize)
