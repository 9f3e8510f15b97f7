"""`MoECausalLM`: the decoder-only language model a native artifact loads into.

Layer `i` is the attention (dense or a mixture of attention experts) and the FFN (dense
SwiGLU or MoE) that `config.layers[i]` describes. Tensor names are those of `docs/artifact-format.md`, so `state_dict()` of this
module and the artifact's safetensors agree key for key.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from moecompose.dtypes import torch_dtype
from moecompose.model.attention_mix import ATTENTION_IMPLS, AttentionImpl, MixtureOfAttention
from moecompose.model.cache import KVCache, LayerKV, StaticKVCache
from moecompose.model.config import (
    AttentionConfig,
    DenseFFNConfig,
    FFNConfig,
    LayerConfig,
    MoAAttentionConfig,
    ModelConfig,
    RoutedFFNConfig,
)
from moecompose.model.loss import linear_cross_entropy
from moecompose.model.moe import DISPATCHES, Dispatch, one_of
from moecompose.model.parts import (
    Attention,
    Mask,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TokenEmbedding,
    padding_mask,
    sequence_mask,
)
from moecompose.model.routing import NexusRouter
from moecompose.model.softcapped_attention import tanh_softcap
from moecompose.model.token_mixing import transition_to_topk


def build_ffn(config: ModelConfig, spec: FFNConfig, dispatch: Dispatch) -> nn.Module:
    """Every FFN module is called as `x -> y`, routed ones as `x -> (y, aux loss)`; a
    routed FFN's config names its module."""
    act = config.hidden_act
    if isinstance(spec, DenseFFNConfig):
        return SwiGLU(config.hidden_size, config.intermediate_size, act)
    return ffn_module(spec)(config.hidden_size, spec, dispatch, act)


def ffn_module(spec: RoutedFFNConfig) -> type[nn.Module]:
    """The module class a routed FFN config names (`"file:Class"` in `moecompose.model`)."""
    file, name = spec.module().split(":")
    return cast(type[nn.Module], getattr(importlib.import_module(f"moecompose.model.{file}"), name))


def build_attention(config: ModelConfig, spec: AttentionConfig) -> nn.Module:
    """Every attention module is called as `(x, cos, sin, mask, cache) -> y` and has
    `cached_kv_heads`."""
    widths = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
              config.head_dim)
    scalar = config.query_pre_attn_scalar
    scores = {"scale": None if scalar is None else scalar**-0.5,
              "softcap": config.attn_logit_softcapping}
    if isinstance(spec, MoAAttentionConfig):
        return MixtureOfAttention(*widths, spec, bias=config.attention_bias, **scores)
    return Attention(*widths, bias=config.attention_bias, qk_norm=config.qk_norm,
                     eps=config.rms_norm_eps, norm_unit_offset=config.norm_unit_offset, **scores)


class _SkipInit(TorchFunctionMode):
    """`torch.nn.init` functions and the random fills (`Tensor.normal_`, `uniform_`) return
    their tensor untouched: for a model made on the meta device to be given its weights.

    On meta tensors they would do nothing anyway, but `normal_` runs there through a Python
    reference kernel whose first call imports `torch._dynamo` (seconds, ~70 MB)."""

    FILLS = (torch.Tensor.normal_, torch.Tensor.uniform_)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


class CausalLMOutput(NamedTuple):
    """logits [B, S, V] (None when the call asked for the loss only); aux_loss: weighted
    auxiliary losses summed over MoE layers, fp32 []; cache: the KV cache passed in, now
    holding this call's tokens too (None without one); loss: with `labels`, `next_token_loss + aux_loss` (fp32 []), else None."""

    logits: Tensor | None
    aux_loss: Tensor
    cache: KVCache | None = None
    loss: Tensor | None = None


def next_token_loss(
    logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy of predicting `labels[:, t + 1]` from `logits[:, t]`, fp32 [].

    logits [B, S, V]; labels [B, S] (-100: not a target); attention_mask [B, S] (0 =
    padding): a padded token is never a target, and neither is the token after one (it
    would be predicted from padding). The mean is over the targets that remain (NaN when
    there are none, as `F.cross_entropy`'s).
    """
    targets = next_token_targets(labels, attention_mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def next_token_targets(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The target of every position [B, S]: `labels[:, t + 1]`, -100 (none) at the last
    position, at padding and after padding (see `next_token_loss`)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, S]: position t predicts t + 1
    if attention_mask is not None:
        real = attention_mask.bool()
        targets = targets.masked_fill(~(real & F.pad(real[:, 1:], (0, 1))), -100)
    return targets


def _last_columns(attention_mask: Tensor | None, labels: Tensor) -> Tensor | None:
    """The mask's last S columns [B, S] (a cached call's mask covers the past too)."""
    if attention_mask is None:
        return None
    return attention_mask[:, attention_mask.shape[-1] - labels.shape[-1] :]


class DecoderLayer(nn.Module):
    """Sequential (Llama): `h = x + attn(n1(x)); y = h + ffn(n2(h))`.
    Parallel (GPT-J, BAM): `y = x + attn(n1(x)) + ffn(n2(x))`.
    Post-norm (OLMo 2): `h = x + n1(attn(x)); y = h + n2(ffn(h))`, n1 and n2 named
    `post_attention_layernorm` and `post_feedforward_layernorm` as in its checkpoints.
    Sandwich (Gemma): `h = x + m1(attn(n1(x))); y = h + m2(ffn(n2(h)))`, named
    `input_layernorm`, `post_attention_layernorm`, `pre_feedforward_layernorm` and
    `post_feedforward_layernorm` (n1, m1, n2, m2) as in its checkpoints.
    """

    def __init__(self, config: ModelConfig, spec: LayerConfig, dispatch: Dispatch) -> None:
        super().__init__()
        d = config.hidden_size
        self.parallel = config.block == "parallel"
        self.self_attn = build_attention(config, spec.attention)
        self.mlp = build_ffn(config, spec.ffn, dispatch)
        self.routed = not isinstance(spec.ffn, DenseFFNConfig)
        self.placement = config.norm_placement
        names = {"pre": ("input_layernorm", "post_attention_layernorm"),
                 "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
                 "sandwich": ("input_layernorm", "post_attention_layernorm",
                              "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        for name in names[self.placement]:
            setattr(self, name, RMSNorm(d, config.rms_norm_eps, config.norm_unit_offset))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Mask,
        cache: LayerKV | None = None,
        tokens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, S, d], tokens [B, S] (bool, False = padding) -> (x [B, S, d], this layer's
        aux loss or None, over the real tokens)."""
        if self.placement == "post":
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, cache))
            ffn, aux = self._ffn(x, tokens)
            return x + self.post_feedforward_layernorm(ffn), aux
        if self.placement == "sandwich":
            attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
            x = x + self.post_attention_layernorm(attn)
            ffn, aux = self._ffn(self.pre_feedforward_layernorm(x), tokens)
            return x + self.post_feedforward_layernorm(ffn), aux
        if self.parallel:
            attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
            ffn, aux = self._ffn(self.post_attention_layernorm(x), tokens)
            return x + attn + ffn, aux
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        ffn, aux = self._ffn(self.post_attention_layernorm(x), tokens)
        return x + ffn, aux

    def _ffn(self, x: Tensor, tokens: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.routed:
            return self.mlp(x, tokens)
        return self.mlp(x), None


class Decoder(nn.Module):
    """Embeddings, decoder layers and the final norm: the `model.` prefix of tensor names."""

    def __init__(self, config: ModelConfig, dispatch: Dispatch) -> None:
        super().__init__()
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size,
                                           config.scale_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, dispatch) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        # Computed, never stored, so real even in a model made on the meta device
        # (`MoECausalLM.from_weights`, which moves them where the weights go).
        meta = torch.get_default_device().type == "meta"
        with torch.device("cpu") if meta else contextlib.nullcontext():
            self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
            # sliding-window layers' own rope (Gemma 3), unscaled
            self.local_rotary_emb = (None if config.rope_local_base_freq is None else
                                     RotaryEmbedding(config.head_dim, config.rope_local_base_freq))
        # per layer: its sliding window (None: full attention), and whether its rope is local
        self.windows = tuple(config.layer_window(i) for i in range(len(config.layers)))
        self.local_rope = tuple(config.local_rope(i) for i in range(len(config.layers)))
        # applied by the LM head, here so that transformers' wrapper (moecompose.hf) has it
        self.final_logit_softcapping = config.final_logit_softcapping

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None,
                position_ids: Tensor | None, cache: KVCache | None) -> tuple[Tensor, Tensor]:
        """As `MoECausalLM.forward`, up to the final norm: (hidden [B, S, d], aux loss [])."""
        B, S = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, S, d]
        if position_ids is not None:
            position_ids = position_ids[:, None]  # [B, 1, S]: broadcast over heads
        elif cache is not None:
            position_ids = cache.positions(S, x.device)  # [S], after the cached tokens
        else:
            position_ids = torch.arange(S, device=x.device)  # [S]
        rope = {False: self.rotary_emb(position_ids, x.dtype)}  # cos, sin [S, dh] or [B, 1, S, dh]
        if self.local_rotary_emb is not None:
            rope[True] = self.local_rotary_emb(position_ids, x.dtype)
        masks: dict[int | None, Mask] = {}  # by window: one per kind of layer
        for window in dict.fromkeys(self.windows):
            if cache is not None:
                mask = cache.mask(S, attention_mask, x.device, window)  # see KVCache.mask
            elif attention_mask is not None:
                mask = padding_mask(attention_mask, window)  # [B, 1, S, S]
            else:
                mask = sequence_mask(S, x.device, window)  # None (causal) or [1, 1, S, S]
            if isinstance(mask, Tensor):
                mask = mask.expand(B, 1, S, mask.shape[-1])  # no size-1 broadcast to guard on
            masks[window] = mask
        tokens = None  # [B, S]: the new tokens that are not padding
        if attention_mask is not None:
            tokens = attention_mask[:, attention_mask.shape[-1] - S :].bool()
        aux = torch.zeros((), device=x.device)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            cos, sin = rope[self.local_rope[i]]
            x, layer_aux = layer(x, cos, sin, masks[self.windows[i]], layer_cache, tokens)
            if layer_aux is not None:
                aux = aux + layer_aux
        if cache is not None:
            cache.advance(S)
        return self.norm(x), aux


class MoECausalLM(nn.Module):
    """Decoder-only LM with per-layer dense or MoE FFNs; see `docs/artifact-format.md`.

    `dispatch` picks the expert kernel of every MoE layer: `"grouped"` (fast, compiles to
    one graph) or `"loop"` (the Hugging Face-style reference).
    """

    def __init__(self, config: ModelConfig, dispatch: Dispatch = "grouped") -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config, dispatch)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        dtype = torch_dtype(config.dtype)
        for p in self.parameters():
            p.data = p.data.to(dtype)
        for name, buffer in self.named_buffers():  # stored buffers (Nexus domain embeddings)
            if name in self.state_dict() and buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)
        self.set_trainable(config.trainable)

    @classmethod
    def from_config(
        cls, config: ModelConfig | Mapping[str, Any], dispatch: Dispatch = "grouped"
    ) -> MoECausalLM:
        """Randomly initialised model for a native config (a dict or a `ModelConfig`)."""
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        return cls(config, dispatch)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        labels: Tensor | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding); position_ids [B, S].

        With a `cache` (from `new_cache()`), the call continues the cached sequences: keys
        and values of `input_ids` are appended to it, positions start after the cached
        tokens and `attention_mask`, if given, is [B, past + S] (a `StaticKVCache` reads
        only its last S columns, so [B, S] will do).

        labels [B, S] (usually `input_ids`, -100 where no loss is wanted): the output's
        `loss` is `next_token_loss(logits, labels, mask) + aux_loss`, `mask` the last S
        columns of `attention_mask`. Padded tokens count in neither term.
        `return_logits=False` (training) leaves the output's `logits` None and computes
        the loss without them, a chunk of tokens at a time (`linear_cross_entropy`): the
        same loss and gradients, without the [B, S, V] logits in memory.
        """
        h, aux = self.model(input_ids, attention_mask, position_ids, cache)  # [B, S, d]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        softcap = self.model.final_logit_softcapping  # Gemma 2
        if labels is not None and not return_logits:
            targets = next_token_targets(labels, _last_columns(attention_mask, labels))
            loss = linear_cross_entropy(h.flatten(0, 1), head, targets.flatten(), softcap)
            return CausalLMOutput(None, aux, cache, loss + aux)
        logits = F.linear(h, head)  # [B, S, V]
        if softcap is not None:
            logits = tanh_softcap(logits, softcap)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels, _last_columns(attention_mask, labels)) + aux
        return CausalLMOutput(logits, aux, cache, loss)

    def new_cache(self, max_length: int | None = None, batch_size: int = 1) -> KVCache:
        """An empty KV cache for this model, to pass to `forward` for incremental decoding.

        Without `max_length`, a `KVCache` that grows with every call; with it, a
        `StaticKVCache` preallocated for `max_length` tokens of `batch_size` sequences,
        whose shapes never change (what a compiled model decodes with).
        """
        if max_length is None:
            return KVCache(len(self.model.layers))
        weight = self.model.embed_tokens.weight
        heads = [layer.self_attn.cached_kv_heads for layer in self.model.layers]
        return StaticKVCache(
            heads, batch_size, max_length, self.config.head_dim, weight.dtype, weight.device
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        max_length: int | None = None,
        forward: Callable[..., CausalLMOutput] | None = None,
    ) -> Tensor:
        """Greedy decoding with a static KV cache: input_ids [B, S] -> [B, S + max_new_tokens].

        `max_length`: tokens the cache holds, at least (and by default) S + max_new_tokens;
        a fixed value lets later calls with other lengths reuse a compiled graph.
        `forward`: what runs each step, `self` by default; pass `compile_model(self)` to
        decode compiled (one graph for the prompt and every step).
        """
        B, S = input_ids.shape
        needed = S + max_new_tokens
        if max_length is None:
            max_length = needed
        elif max_length < needed:
            raise ValueError(f"max_length={max_length} is less than {S} + {max_new_tokens} tokens")
        run = self if forward is None else forward
        cache = self.new_cache(max_length=max_length, batch_size=B)
        tokens = [input_ids]
        step = input_ids
        for _ in range(max_new_tokens):
            logits = run(step, cache=cache).logits  # [B, s, V]
            step = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
            tokens.append(step)
        return torch.cat(tokens, dim=1)

    def kv_cache_bytes_per_token(self) -> list[int]:
        """Bytes of KV cache each layer holds per cached token (per sequence)."""
        size = torch.empty((), dtype=torch_dtype(self.config.dtype)).element_size()
        return [
            2 * layer.self_attn.cached_kv_heads * self.config.head_dim * size
            for layer in self.model.layers
        ]

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Switch every mixture-of-attention layer between `"fused"` and the `"loop"` reference."""
        one_of("impl", impl, ATTENTION_IMPLS)
        for module in self.modules():
            if isinstance(module, MixtureOfAttention):
                module.impl = impl

    def set_dispatch(self, dispatch: Dispatch) -> None:
        """Switch every MoE layer between the `"grouped"` and the `"loop"` expert kernels
        (the modules with a `dispatch`: `GroupedExperts`, `GroupedAdapters`)."""
        one_of("dispatch", dispatch, DISPATCHES)
        for module in self.modules():
            if hasattr(module, "dispatch"):
                module.dispatch = dispatch

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig | Mapping[str, Any],
        state_dict: Mapping[str, Tensor],
        dispatch: Dispatch = "grouped",
        device: torch.device | str | None = None,
    ) -> MoECausalLM:
        """The model of `config` holding `state_dict` (every tensor, native names), made
        without running any initialisation: the module is built on the meta device and
        the tensors, cast to the config's dtype and moved to `device` (CPU by default),
        become its parameters and stored buffers (`load_state_dict(assign=True)`); the
        buffers that are not stored (rotary frequencies, Nexus expert embeddings) are then
        computed there. A tensor already of the right dtype and device is used as it is,
        not copied. Raises `ValueError` as `load_weights` with `strict` does.
        """
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        with _SkipInit(), torch.device("meta"):
            model = cls(config, dispatch)
        own = model.state_dict()
        model._check_weights(state_dict, strict=True)
        device = torch.device("cpu" if device is None else device)
        model.load_state_dict(
            {name: t.to(device=device, dtype=own[name].dtype) for name, t in state_dict.items()},
            assign=True,
        )
        model._compute_unsaved_buffers(device)
        return model

    def _compute_unsaved_buffers(self, device: torch.device) -> None:
        """Give the buffers that state dicts leave out their values on `device`, after an
        assign-load into a meta model: the rotary frequencies (computed on the CPU while
        the model was made, as a model built there and moved has them) and the Nexus
        routers' cached expert embeddings."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.to(device)
            if isinstance(module, NexusRouter):
                module.refresh()

    def _check_weights(
        self, state_dict: Mapping[str, Tensor], strict: bool
    ) -> tuple[list[str], list[str]]:
        """(missing, unexpected) names of `state_dict`; raises as `load_weights` says."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            lines = []
            if missing:
                lines.append(f"missing tensors ({len(missing)}): {_names(missing)}")
            if unexpected:
                lines.append(f"unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
            raise ValueError("state dict does not match the model config:\n  " + "\n  ".join(lines))
        wrong = [
            f"{name}: expected {tuple(own[name].shape)}, got {tuple(state_dict[name].shape)}"
            for name in own
            if name in state_dict and own[name].shape != state_dict[name].shape
        ]
        if wrong:
            raise ValueError(
                "tensor shapes do not match the model config:\n  " + "\n  ".join(wrong)
            )
        return missing, unexpected

    def load_weights(
        self, state_dict: Mapping[str, Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copy tensors into the parameters (cast to their dtype); returns (missing, unexpected).

        Raises `ValueError` naming the tensors: with `strict`, for any missing or unexpected
        name; always, for a shape that differs from the config's.
        """
        missing, unexpected = self._check_weights(state_dict, strict)
        own = self.state_dict()
        with torch.no_grad():
            for name, tensor in own.items():
                if name in state_dict:
                    tensor.copy_(state_dict[name])
        for module in self.modules():  # eval-mode caches derived from the loaded weights
            if isinstance(module, NexusRouter) and not module.training:
                module.refresh()
        return missing, unexpected

    def set_trainable(self, names: Iterable[str] | None) -> None:
        """None makes every parameter trainable; otherwise only the named tensors."""
        params = dict(self.named_parameters())
        if names is None:
            keep = set(params)
        else:
            keep = set(names)
            unknown = sorted(keep - set(params))
            if unknown:
                raise ValueError(f"trainable names tensors this model does not have: {unknown}")
        for name, p in params.items():
            p.requires_grad_(name in keep)

    def transition_to_topk(self) -> dict[str, Any]:
        """Mixture-of-Tokens layers become top-1 token-choice MoE layers, in place (see
        `token_mixing.transition_to_topk`); returns the updated native config dict."""
        return transition_to_topk(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
