"""Keys and values of earlier tokens, for incremental decoding.

A cache holds one entry per decoder layer. Each attention module writes the rotated keys
and the values of the new tokens to its layer's entry and attends over what the entry
returns. What an entry holds depends on the layer's attention: dense attention caches
`[B, kv, L, dh]`; an expert-KV mixture of attention `[B, E*kv, L, dh]` (every expert its
own keys); a shared-KV mixture `[B, kv, L, dh]` (one for all experts).

Two kinds, same numbers:

* `KVCache` grows: every call concatenates the new tokens to each entry, so `L` is the
  number of tokens so far. Nothing to size in advance, but every step has new shapes.
* `StaticKVCache` is preallocated for `max_length` tokens (`L = max_length` always). New
  tokens are written in place at their positions (`index_copy_`), attention reads the
  whole buffer, and the mask hides the positions not written yet. The cache's shapes and
  the write position (a tensor) never change, so a compiled model decodes every step with
  the graph of the first one.

The decoder calls `positions` and `mask` before the layers and `advance` after them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecompose.model.parts import ALL_KEYS, Mask, causal_mask, key_mask, sequence_mask


@torch.library.custom_op("moecompose::kv_cache_slots", mutates_args=())
def _slots(position: Tensor, query_len: int, max_length: int) -> Tensor:
    """Positions `position + [0, query_len)` [S] where new tokens go; `ValueError` if they
    do not fit in `max_length`. An opaque op, so that compiled code checks too (reading
    `position` in the traced program would be a graph break; an unchecked out-of-range
    write aborts a compiled kernel). Only this CPU kernel reads `position` on the host, so
    the op is not tagged `cudagraph_unsafe`: CUDA graphs capture its CUDA kernel."""
    past = int(position)
    if past + query_len > max_length:
        raise ValueError(
            f"KV cache overflow: {query_len} new token(s) after {past} cached exceed "
            f"max_length={max_length}; make the cache with a larger max_length"
        )
    return torch.arange(past, past + query_len, device=position.device)


@_slots.register_fake
def _(position: Tensor, query_len: int, max_length: int) -> Tensor:
    return position.new_empty(query_len)


@_slots.register_kernel("cuda")
def _(position: Tensor, query_len: int, max_length: int) -> Tensor:
    """On CUDA the check is a device-side assert: reading `position` on the host would
    wait for the device every step (and cannot run inside a CUDA graph)."""
    torch._assert_async(position + query_len <= max_length, "KV cache overflow")
    return position + torch.arange(query_len, device=position.device)


class LayerKV:
    """One layer's cached keys and values, [B, n, L, dh] each; None before the first update."""

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' key, value [B, n, S, dh]; returns all of them [B, n, L, dh]."""
        if self.key is not None and self.value is not None:
            key = torch.cat((self.key, key), dim=-2)
            value = torch.cat((self.value, value), dim=-2)
        self.key, self.value = key, value
        return key, value

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value) if t is not None)


class KVCache:
    """Per-layer caches of a decoder, grown by concatenation; pass the same object to every
    forward call of one generation (`MoECausalLM.new_cache()` makes an empty one)."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[LayerKV] = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self.layers[0].length if self.layers else 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def positions(self, query_len: int, device: torch.device) -> Tensor:
        """Default positions [S] of `query_len` new tokens: they follow the cached ones."""
        past = self.length
        return torch.arange(past, past + query_len, device=device)

    def mask(
        self,
        query_len: int,
        attention_mask: Tensor | None,
        device: torch.device,
        window: int | None = None,
    ) -> Mask:
        """The keys each new token attends to (within the sliding `window`, when given).

        `attention_mask` [B, past + S] (1 = token, 0 = padding) or None (no padding).
        With padding, a bool mask [B, 1, S, L]. Without, no tensor where it would hide
        nothing, so that attention keeps its fused kernels: the first call's tokens are
        plain causal where `sequence_mask` says so, and in eager calls one new token whose
        window covers every key sees them all (`ALL_KEYS`; a compiled graph serves every
        length, so it keeps the mask). Several new tokens after cached ones get a mask
        [1, 1, S, L]: a causal flag would align the diagonal with the first key, not the
        last.
        """
        past = self.length
        if attention_mask is None and past == 0:
            return sequence_mask(query_len, device, window)
        if (attention_mask is None and not torch.compiler.is_compiling() and query_len == 1
                and (window is None or past < window)):
            return ALL_KEYS
        return causal_mask(query_len, past, attention_mask, device, window)

    def advance(self, query_len: int) -> None:
        """Called after every layer has written the new tokens (nothing to do here)."""


class StaticLayerKV(LayerKV):
    """One layer's keys and values, preallocated [B, n, max_length, dh] each, written at the
    cache's current position."""

    def __init__(self, key: Tensor, value: Tensor, cache: StaticKVCache) -> None:
        self.key: Tensor = key
        self.value: Tensor = value
        self.cache = cache

    @property
    def position(self) -> Tensor:
        return self.cache.position

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens' key, value [B, n, S, dh] at positions `position + [0, S)`;
        returns the whole buffers [B, n, max_length, dh]. The buffers keep the model's
        dtype: under autocast the new keys (bf16, say) are stored in it."""
        index = self.cache.slots(key.shape[-2])  # [S]
        self.key.index_copy_(2, index, key.to(self.key.dtype))
        self.value.index_copy_(2, index, value.to(self.value.dtype))
        return self.key, self.value

    @property
    def length(self) -> int:
        """Tokens written so far (`nbytes` counts the whole buffers, written or not)."""
        return int(self.position)


class StaticKVCache(KVCache):
    """Per-layer caches preallocated for `max_length` tokens of `batch_size` sequences
    (`MoECausalLM.new_cache(max_length=..., batch_size=...)` makes one).

    `heads[i]` is layer i's cached key (and value) heads. `position` [] (int64) is the
    number of tokens written so far; `keep` [B, max_length] (bool) marks which of them are
    tokens (False = padding). Writing past `max_length` raises `ValueError`.
    """

    def __init__(
        self,
        heads: list[int],
        batch_size: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(
                f"max_length and batch_size must be positive, got {max_length}, {batch_size}"
            )
        self.max_length = max_length
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._slots: Tensor | None = None  # this call's write positions, once checked
        self.keep = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self.layers: list[LayerKV] = [
            StaticLayerKV(
                torch.zeros(batch_size, n, max_length, head_dim, dtype=dtype, device=device),
                torch.zeros(batch_size, n, max_length, head_dim, dtype=dtype, device=device),
                self,
            )
            for n in heads
        ]
        # Buffers that live across calls and are written in place: static addresses, so a
        # model compiled with mode="reduce-overhead" keeps them out of its CUDA graphs'
        # copied inputs and replays the graph on them (as transformers' StaticCache does).
        for tensor in (self.position, self.keep, *self.buffers()):
            torch._dynamo.mark_static_address(tensor)

    def buffers(self) -> list[Tensor]:
        """Every layer's key and value buffers."""
        return [t for layer in self.layers for t in (layer.key, layer.value) if t is not None]

    def positions(self, query_len: int, device: torch.device) -> Tensor:
        return self.position + torch.arange(query_len, device=device)

    def slots(self, query_len: int) -> Tensor:
        """Where this call's `query_len` new tokens go [S]: checked to fit once per call
        (in `mask`, before any layer writes) and then shared by the layers, so that
        decoding reads the position on the host once per step, not once per layer. The
        layers' writes take this tensor as input, so a compiled graph cannot order a
        write before the check."""
        if self._slots is None or self._slots.shape[0] != query_len:
            self._slots = _slots(self.position, query_len, self.max_length)
        return self._slots

    def mask(self, query_len: int, attention_mask: Tensor | None, device: torch.device,
             window: int | None = None) -> Tensor:
        """As `KVCache.mask`, but always a tensor, [B, 1, S, max_length], since it hides the
        positions not written yet: causal over the written positions (and within the
        sliding `window`, when given), padding hidden.

        Also records the new tokens' padding: the last S columns of `attention_mask`
        ([B, past + S] as for `KVCache`, or just [B, S]); None means no padding. Raises
        `ValueError` if the new tokens do not fit.
        """
        q_pos = self.slots(query_len)  # [S]
        k_pos = torch.arange(self.max_length, device=device)  # [L]
        if attention_mask is None:
            new = torch.ones(self.keep.shape[0], query_len, dtype=torch.bool, device=device)
        else:
            new = attention_mask[:, attention_mask.shape[-1] - query_len :].bool()  # [B, S]
        self.keep.index_copy_(1, q_pos, new)
        return key_mask(q_pos, k_pos, self.keep, window)  # hides positions not written yet

    def advance(self, query_len: int) -> None:
        """Move the write position past the new tokens (in place, so compiled code sees it)."""
        self.position.add_(query_len)
        self._slots = None
