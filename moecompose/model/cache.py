"""Keys and values of earlier tokens, for incremental decoding.

A `KVCache` holds one `LayerKV` per decoder layer. Each attention module appends the
rotated keys and the values of the new tokens to its layer's entry and attends over
everything cached. What an entry holds depends on the layer's attention: dense
attention caches `[B, kv, L, dh]`; an expert-KV mixture of attention `[B, E*kv, L, dh]`
(every expert its own keys); a shared-KV mixture `[B, kv, L, dh]` (one for all experts).
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    """Per-layer caches of a decoder; pass the same object to every forward call of one
    generation (`MoECausalLM.new_cache()` makes an empty one)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far."""
        return self.layers[0].length if self.layers else 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
