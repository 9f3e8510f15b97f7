"""Dense building blocks, numerically the same as Hugging Face's Llama / Qwen2 / Gemma
modules."""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Final, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.activations import GATE_ACTIVATIONS
from moecompose.model.config import FFNActivation, LinearRopeScalingConfig, RopeScalingConfig
from moecompose.model.softcapped_attention import softcapped_attention

if TYPE_CHECKING:
    from moecompose.model.cache import LayerKV


class RMSNorm(nn.Module):
    """`w * x / rms(x)`, computed in fp32 and cast back before the weight, as HF Llama does.

    With `unit_offset` (Gemma): `(1 + w) * x / rms(x)`, all in fp32 and cast back after
    the weight; the weight is stored as the offset `w` (zeros: the identity), as Gemma's
    checkpoints hold it, since `1 + w` in bf16 would lose w's low bits."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class TokenEmbedding(nn.Embedding):
    """Token embeddings; with `scaled` (Gemma) multiplied by `sqrt(dim)`, as Gemma does it:
    the factor rounded to fp32, then to the embeddings' dtype (a bf16 model multiplies by
    bf16(sqrt(dim)))."""

    def __init__(self, num_embeddings: int, dim: int, scaled: bool = False) -> None:
        super().__init__(num_embeddings, dim)
        self.scale = struct.unpack("f", struct.pack("f", dim**0.5))[0] if scaled else None

    def forward(self, input_ids: Tensor) -> Tensor:
        x = super().forward(input_ids)
        if self.scale is None:
            return x
        return x * torch.full((), self.scale, dtype=x.dtype, device=x.device)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
) -> Tensor:
    """Inverse frequencies `[head_dim // 2]` with HF's `default`, `linear` and `llama3` rules."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScalingConfig):
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings  # llama3
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables `[S, head_dim]` for positions `[S]`, computed in fp32 on the fly."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [..., S, dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [..., S, dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, h, S, dh]; cos, sin: [S, dh] or [B, 1, S, dh]."""
    return x * cos + rotate_half(x) * sin


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, S, n*dh] -> [B, n, S, dh] (a view)."""
    B, S, _ = x.shape
    return x.view(B, S, n_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, n, S, dh] -> [B, S, n*dh]."""
    B, n, S, dh = x.shape
    return x.transpose(1, 2).reshape(B, S, n * dh)


ALL_KEYS: Final = "all keys"
"""The mask of queries that see every key: one new token after its whole past."""

Mask = Tensor | Literal["all keys"] | None
"""What attention is told to hide: None, the causal diagonal with S == L (attention's fast
path); `ALL_KEYS`, nothing (no mask and not causal); or a bool mask [B or 1, 1, S, L],
True = attend."""


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Mask, scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Grouped-query attention: q [B, hq, S, dh], k, v [B, hkv, L, dh] -> [B, hq, S, dh].

    Query head i reads key/value head `i // (hq // hkv)`. `mask`: see `Mask`; a tensor
    mask keeps SDPA off its flash kernel, so the other two are what decoding wants.
    Scores are scaled by `scale` (None: `dh ** -0.5`); with `softcap` they become
    `softcap * tanh(s / softcap)` before the mask (Gemma 2), which SDPA's fused kernels
    cannot do, so that case is computed explicitly, by an op of its own
    (`softcapped_attention`).
    """
    attn_mask = mask if isinstance(mask, Tensor) else None
    is_causal = mask is None
    if softcap is not None:
        return softcapped_attention(q, k, v, attn_mask, is_causal, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions (Llama; Qwen2 adds q/k/v
    bias, Qwen3 per-head q/k norms, OLMo 2 q/k norms over all heads, Gemma a score scale
    and soft-capping)."""

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False,
        qk_norm: str | None = None, eps: float = 1e-6, norm_unit_offset: bool = False,
        scale: float | None = None, softcap: float | None = None,
    ) -> None:
        """``qk_norm``: queries and keys pass an RMSNorm (``q_norm``, ``k_norm``, with
        ``norm_unit_offset`` as `RMSNorm`'s) before rope: ``"head"`` per head (weights
        [head_dim], Qwen3, Gemma 3), ``"full"`` over all heads (weights [heads * head_dim],
        OLMo 2); None: no such norm. ``scale`` and ``softcap``: as in `attend`."""
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.softcap = softcap
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.qk_norm = qk_norm
        widths = (head_dim, head_dim) if qk_norm == "head" else (n_heads * head_dim,
                                                                   n_kv_heads * head_dim)
        self.q_norm = None if qk_norm is None else RMSNorm(widths[0], eps, norm_unit_offset)
        self.k_norm = None if qk_norm is None else RMSNorm(widths[1], eps, norm_unit_offset)

    @property
    def cached_kv_heads(self) -> int:
        """Key (and value) heads a KV cache holds per token."""
        return self.n_kv_heads

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Mask = None,
        cache: LayerKV | None = None,
    ) -> Tensor:
        """x: [B, S, d]; cos, sin: rotary tables; mask: see `Mask` (default: causal);
        cache: this layer's keys and values of earlier tokens, extended in place."""
        q, k = self.q_proj(x), self.k_proj(x)  # [B, S, h*dh], [B, S, kv*dh]
        if self.qk_norm == "full" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = split_heads(q, self.n_heads)  # [B, h, S, dh]
        k = split_heads(k, self.n_kv_heads)  # [B, kv, S, dh]
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        if self.qk_norm == "head" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, kv, L, dh]
        return self.o_proj(merge_heads(attend(q, k, v, mask, self.scale, self.softcap)))


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor,
           activation: FFNActivation = "silu") -> Tensor:
    """`down(act(gate(x)) * up(x))`: x [..., d], gate/up [f, d], down [d, f] -> [..., d];
    `act` is silu (SwiGLU) or, with `activation="gelu_tanh"`, tanh-GELU (GeGLU)."""
    act = GATE_ACTIVATIONS[activation]
    return F.linear(act(F.linear(x, gate)) * F.linear(x, up), down)


class SwiGLU(nn.Module):
    """`swiglu` with weights `{gate,up,down}_proj`: the Llama FFN (Gemma's with
    `activation="gelu_tanh"`), also a shared expert."""

    def __init__(self, dim: int, hidden: int, activation: FFNActivation = "silu") -> None:
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                      self.activation)


def visible(q_pos: Tensor, k_pos: Tensor, window: int | None = None) -> Tensor:
    """Bool [S, L]: key slot `k_pos[j]` is visible from query slot `q_pos[i]`: causal and,
    with a sliding `window`, one of the query's last `window` slots (itself included), as
    Hugging Face's sliding-window mask (`key > query - window`)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
    return mask


def causal_mask(
    query_len: int,
    past: int,
    attention_mask: Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> Tensor:
    """Bool mask [B or 1, 1, S, past + S] for S queries following `past` cached tokens,
    limited to a sliding `window` when given (see `visible`).

    `attention_mask` [B, past + S] (1 = token, 0 = padding) hides padded keys; a padded
    query still sees itself, so no row is empty; its output is never meaningful.
    """
    q_pos = torch.arange(query_len, device=device) + past  # [S]
    k_pos = torch.arange(past + query_len, device=device)  # [L]
    keep = None if attention_mask is None else attention_mask.bool()
    return key_mask(q_pos, k_pos, keep, window)


def key_mask(q_pos: Tensor, k_pos: Tensor, keep: Tensor | None, window: int | None) -> Tensor:
    """Bool mask [B or 1, 1, S, L]: key slot `k_pos[j]` is `visible` from query slot
    `q_pos[i]` and holds a token (`keep` [B, L], False = padding; None: all do). A query
    always sees its own slot, so no row is empty."""
    mask = visible(q_pos, k_pos, window)  # [S, L]
    if keep is None:
        return mask[None, None]
    return (mask & keep[:, None, None, :]) | (k_pos[None, :] == q_pos[:, None])


def sequence_mask(query_len: int, device: torch.device, window: int | None) -> Tensor | None:
    """Mask of S tokens with nothing cached and no padding: None (plain causal, attention's
    fast path) unless a sliding `window` hides some key. Eager calls skip the window when
    S <= window; a compiled graph serves every length, so it always builds the mask."""
    if window is None or (not torch.compiler.is_compiling() and query_len <= window):
        return None
    return causal_mask(query_len, 0, None, device, window)


def padding_mask(attention_mask: Tensor, window: int | None = None) -> Tensor:
    """Causal mask that also hides padded keys: bool [B, 1, S, S] from `attention_mask` [B, S]
    (and keys outside a sliding `window`)."""
    return causal_mask(attention_mask.shape[-1], 0, attention_mask, attention_mask.device, window)
