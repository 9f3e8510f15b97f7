"""Attention with soft-capped scores (Gemma 2), as one opaque op for `torch.compile`.

`softcapped_attention(q, k, v, mask, is_causal, scale, cap)`: the scores `s = scale * q k^T`
[B, hq, S, L] become `cap * tanh(s / cap)` before the mask and a softmax in fp32 (fp64
for fp64 inputs), as in Hugging Face's eager Gemma 2 attention. SDPA's fused kernels cannot cap the scores, and
Inductor cannot lower the explicit batched matmuls when batch and sequence length are
unbacked sizes (`compile_model`): its CPU `bmm` lowering tests `S == 1`. So forward and
backward are `torch.library.custom_op`s whose fake implementations give the output
shapes from the input shapes, as the grouped experts' ops do.

Grouped-query attention needs no copy of k and v: the g = hq / hkv query heads that read
one key/value head are stacked along the rows, `[B, hkv, g*S, dh]`. The backward
recomputes the probabilities from q and k, so nothing of size [B, h, S, L] is saved
between forward and backward. Under `torch.autocast` the ops run like `mm`
(`autocast_rule`): the forward in the autocast dtype, the backward in the saved dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecompose.model.grouped_swiglu import autocast_rule


def tanh_softcap(x: Tensor, cap: float) -> Tensor:
    """`cap * tanh(x / cap)`: x squashed smoothly into (-cap, cap) (Gemma 2's soft-capping)."""
    return torch.tanh(x / cap) * cap


def _rows(x: Tensor, kv_heads: int) -> Tensor:
    """[B, hq, S, d] -> [B, hkv, g*S, d]: each key/value head's query heads as rows."""
    B, h, S, d = x.shape
    return x.reshape(B, kv_heads, (h // kv_heads) * S, d)


def _probabilities(
    q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, scale: float, cap: float
) -> tuple[Tensor, Tensor]:
    """(p in fp32 or fp64, t = tanh(s / cap)) [B, hkv, g*S, L] for q [B, hq, S, dh],
    k [B, hkv, L, dh]."""
    B, hq, S, _ = q.shape
    hkv, L = k.shape[1], k.shape[2]
    scores = torch.matmul(_rows(q, hkv), k.transpose(-2, -1)) * scale  # [B, hkv, g*S, L]
    t = torch.tanh(scores / cap)
    capped = (t * cap).view(B, hkv, hq // hkv, S, L)
    if is_causal:  # S == L
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril()
    elif mask is not None:
        mask = mask[:, :, None]  # [B or 1, 1, 1, S, L]
    if mask is not None:
        capped = capped.masked_fill(~mask, float("-inf"))
    capped = capped.view(B, hkv, -1, L)
    return torch.softmax(capped, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)), t


@torch.library.custom_op("moecompose::softcapped_attention", mutates_args=())
def _softcapped_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
    cap: float,
) -> Tensor:
    p, _ = _probabilities(q, k, mask, is_causal, scale, cap)
    return torch.matmul(p.to(q.dtype), v).view(*q.shape[:-1], v.shape[-1])  # [B, hq, S, dv]


@_softcapped_attention.register_fake
def _(q, k, v, mask, is_causal, scale, cap):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("moecompose::softcapped_attention_backward", mutates_args=())
def _softcapped_attention_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
    scale: float, cap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k and v."""
    hkv = k.shape[1]
    p, t = _probabilities(q, k, mask, is_causal, scale, cap)  # [B, hkv, g*S, L]
    do = _rows(do, hkv)  # [B, hkv, g*S, dv]
    dv = torch.matmul(p.to(do.dtype).transpose(-2, -1), do)  # [B, hkv, L, dv]
    dp = torch.matmul(do, v.transpose(-2, -1)).to(p.dtype)  # [B, hkv, g*S, L]
    dz = p * (dp - (dp * p).sum(dim=-1, keepdim=True))  # through the softmax
    ds = (dz * (1 - t.to(p.dtype).square()) * scale).to(q.dtype)  # the cap and the scale
    dq = torch.matmul(ds, k).view(q.shape)
    dk = torch.matmul(ds.transpose(-2, -1), _rows(q, hkv))  # [B, hkv, L, dh]
    return dq, dk, dv


@_softcapped_attention_backward.register_fake
def _(do, q, k, v, mask, is_causal, scale, cap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, is_causal, scale, cap = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.is_causal, ctx.scale, ctx.cap = is_causal, scale, cap


def _backward(ctx, do):
    q, k, v, mask = ctx.saved_tensors
    dq, dk, dv = _softcapped_attention_backward(do, q, k, v, mask, ctx.is_causal, ctx.scale,
                                                ctx.cap)
    return dq, dk, dv, None, None, None, None


_softcapped_attention.register_autograd(_backward, setup_context=_setup_context)
autocast_rule("softcapped_attention", cast=True)
autocast_rule("softcapped_attention_backward", cast=False)


def softcapped_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
    scale: float | None, cap: float,
) -> Tensor:
    """Grouped-query attention with soft-capped scores: q [B, hq, S, dh], k, v
    [B, hkv, L, dh] -> [B, hq, S, dh]. As SDPA's: `mask` None or bool [B or 1, 1, S, L]
    (True = attend), `is_causal` (with no mask, S == L) hides the keys after each query;
    neither, nothing is hidden. `scale` None for `dh ** -0.5`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _softcapped_attention(q, k, v, mask, is_causal, float(scale), float(cap))
