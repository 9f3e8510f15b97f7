"""Mixture of Tokens (Antoniak et al. 2023): experts see mixtures of tokens of a group.

Shapes: `B` sequences, `S` positions, `d` model width, `E` experts, `f` expert width, `G`
group size, `n = ceil(B / G)` groups. A group is G sequences of the batch at one
position, never tokens of one sequence, so a causal LM stays causal. Tensor names follow
`docs/artifact-format.md`: the controller (a `TokenMixingRouter`) `router.weight` [E, d],
with `learn_temperature` `router.temperature` [], and stacked experts
`experts.{gate,up}_proj` [E, f, d], `experts.down_proj` [E, d, f], as in an ordinary MoE
layer.

    w   = softmax(x_group @ router.weight.T / T, dim=group)  # [G, E] per position, fp32
    m_e = sum_g w[g, e] x_g                                 # one mixed token per expert
    y_g = sum_e w[g, e] * expert_e(m_e)

A batch that is not a multiple of G is padded with zero rows whose logits are -inf, so
their weight is 0 and the real rows come out as without padding; no group is padding only.
A group with one real row gives that row weight 1 for every expert: it receives
`sum_e expert_e(x)`. Every expert runs once per group and position (`E / G` expert
evaluations per token): one GEMM chain per expert over all groups and positions, inside
the grouped SwiGLU op that token-choice layers use (whose backward writes each expert's
weight gradients in place, never a zero-filled copy of the whole stack per expert).

`transition_to_topk` turns the mixing layers into top-1 token-choice MoE layers for
inference on single sequences (the paper's transition to sparse, followed by a short
fine-tune).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.config import (
    FFNActivation,
    MoEFFNConfig,
    TokenMixingRouterConfig,
    TopKRouterConfig,
)
from moecompose.model.grouped_swiglu import autocast_rule, grouped_swiglu
from moecompose.model.moe import Dispatch, GroupedExperts, MoEFFN
from moecompose.model.routing import TokenMixingRouter

if TYPE_CHECKING:
    from moecompose.model.causal_lm import MoECausalLM


@torch.library.custom_op("moecompose::batch_major", mutates_args=())
def batch_major(y: Tensor, batch: int) -> Tensor:
    """Position-major rows [S, P, d] (P >= batch, padding last) -> the first `batch`
    rows as a contiguous [batch, S, d].

    A plain `transpose(0, 1).contiguous()` does the same; as an opaque op its output
    layout is fixed, so Inductor cannot give the residual sum that consumes it the
    transposed layout of this input. Under `compile_model` (unbacked B and S) that layout
    change would not reach the backward graph, whose saved-activation strides would then
    be wrong. Under autocast it keeps y's dtype, as a transpose would."""
    return y.new_empty(batch, y.shape[0], y.shape[2]).copy_(y[:, :batch].transpose(0, 1))


@batch_major.register_fake
def _(y: Tensor, batch: int) -> Tensor:
    return y.new_empty(batch, y.shape[0], y.shape[2])


def _batch_major_setup(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
    ctx.rows = inputs[0].shape[1]


def _batch_major_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
    """[batch, S, d] -> [S, P, d], zero for the padding rows."""
    return F.pad(grad.transpose(0, 1), (0, 0, 0, ctx.rows - grad.shape[0])), None


batch_major.register_autograd(_batch_major_backward, setup_context=_batch_major_setup)
autocast_rule("batch_major", cast=False)


class TokenMixingFFN(nn.Module):
    """An MoE FFN layer whose router is a token-mixing controller, without a shared expert
    (a spec cannot combine them). forward takes [B, S, d] and returns (y, aux loss) with a
    zero aux loss: every expert gets the same number of mixed tokens, so there is nothing
    to balance. `dispatch` is the kernel the experts get after `transition_to_topk`."""

    def __init__(self, dim: int, spec: MoEFFNConfig, dispatch: Dispatch = "grouped",
                 activation: FFNActivation = "silu") -> None:
        super().__init__()
        if not isinstance(spec.router, TokenMixingRouterConfig):
            raise ValueError(
                f"TokenMixingFFN needs a token_mixing router, got {spec.router.kind!r}"
            )
        self.num_experts = spec.num_experts
        self.router = TokenMixingRouter(dim, spec.num_experts, spec.router)
        self.experts = GroupedExperts(spec.num_experts, dim, spec.intermediate_size, dispatch,
                                      activation)

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, S, d], tokens [B, S] (bool, False = padding) -> (y [B, S, d], aux loss [] = 0).

        Padded tokens get weight 0 in their group, like the rows that pad the batch to a
        multiple of G, so the real tokens come out as without them (a group that holds
        only padding at a position mixes its rows as without a mask).

        Works position-major: `M = S * n` groups of [G, d], so mixing and combining are
        `bmm`s over M whose matrices have static sizes (G, E, d), and each expert runs once
        on its M mixed tokens. Under `compile_model` B and S are unbacked sizes: a `bmm`
        over experts (Inductor tests `rows == 1`) or one reshape that splits and merges at
        once (`[S, n*G] -> [S*n, G]`) would not compile, hence the shapes here; the
        result goes back to [B, S, d] through `batch_major`, so forward and backward
        compile once for every batch and length."""
        B, S, d = x.shape
        G = self.router.group_size
        n = (B + G - 1) // G
        xt = x.transpose(0, 1)  # [S, B, d]
        padded = F.pad(xt, (0, 0, 0, n * G - B)).contiguous()  # [S, n * G, d], zero rows last
        padded = padded.view(S, n, G, d).view(S * n, G, d)  # [M, G, d]
        real = (torch.arange(n * G, device=x.device) < B).view(n, G).repeat(S, 1)  # [M, G]
        if tokens is not None:
            kept = F.pad(tokens.t().to(torch.uint8), (0, n * G - B))  # [S, n * G]
            kept = real & kept.view(S, n, G).view(S * n, G).bool()  # [M, G]
            real = torch.where(kept.any(dim=1, keepdim=True), kept, real)
        w = self.router(padded, real).to(x.dtype)  # [M, G, E]
        mixed = torch.bmm(w.transpose(1, 2), padded)  # [M, E, d]
        ex, E, M = self.experts, self.num_experts, mixed.shape[0]
        # Mixed token (m, e) is row m * E + e of `mixed`; expert e takes rows e, E + e, ...
        order = (
            torch.arange(E, device=x.device)[:, None] + E * torch.arange(M, device=x.device)
        ).flatten()
        counts = torch.full((E,), M, device=x.device)
        out = grouped_swiglu(
            mixed.view(M * E, d), order, counts, ex.gate_proj, ex.up_proj, ex.down_proj,
            ex.activation,
        ).view(M, E, d)
        y = torch.bmm(w, out).view(S, n, G, d).view(S, n * G, d)  # [S, n * G, d]
        return batch_major(y, B), x.new_zeros((), dtype=torch.float32)  # [B, S, d]

    def to_topk(self, spec: MoEFFNConfig) -> MoEFFN:
        """The top-1 token-choice layer of the transition to sparse: the same experts, and
        `router.weight = controller / T`, so each token goes to the expert of its largest
        `x @ controller.T / T` with weight 1 (`spec.router` must be top-1 with
        `normalize`; the aux-loss coefficients of `spec` apply from now on).
        The new router weight is trainable iff the controller was."""
        router = spec.router
        if not (isinstance(router, TopKRouterConfig) and router.k == 1 and router.normalize):
            raise ValueError(f"transition needs a top-1 normalized router, got {router}")
        with torch.device("meta"):
            layer = MoEFFN(self.router.weight.shape[1], spec, self.experts.dispatch,
                           self.experts.activation)
        layer.experts = self.experts
        controller = self.router.weight
        temperature = torch.as_tensor(self.router.temperature).detach().float()
        weight = (controller.detach().float() / temperature).to(controller.dtype)
        layer.router.weight = nn.Parameter(weight, requires_grad=controller.requires_grad)
        return layer


def transition_to_topk(model: MoECausalLM) -> dict[str, Any]:
    """Turn every token-mixing layer of `model` into a top-1 token-choice MoE layer, in
    place; returns the updated native config dict (to save with the weights).

    Mapping: `router.weight = controller / T` (T the learned or configured temperature),
    router `{"kind": "topk", "k": 1, "normalize": true}` so the chosen expert's weight is
    1; experts and aux-loss coefficients are kept. A learned temperature tensor disappears
    (and from `trainable`). Afterwards every batch size works, 1 included, with ordinary
    routing; outputs differ from the mixing layer's, so the paper follows the transition
    with a short fine-tune.
    """
    config = model.config
    layers = list(config.layers)
    dropped: set[str] = set()
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, TokenMixingFFN):
            continue
        spec = layers[i].ffn
        assert isinstance(spec, MoEFFNConfig) and isinstance(spec.router, TokenMixingRouterConfig)
        if spec.router.learn_temperature:
            dropped.add(f"model.layers.{i}.mlp.router.temperature")
        sparse = spec.model_copy(update={"router": TopKRouterConfig(k=1, normalize=True)})
        layer.mlp = layer.mlp.to_topk(sparse)
        layers[i] = layers[i].model_copy(update={"ffn": sparse})
    trainable = config.trainable
    if trainable is not None:
        trainable = tuple(name for name in trainable if name not in dropped)
    model.config = config.model_copy(update={"layers": tuple(layers), "trainable": trainable})
    return model.config.to_dict()
