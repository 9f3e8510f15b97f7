"""`MoECausalLM`: the decoder-only language model a native artifact loads into.

Layer `i` is attention plus the FFN that `config.layers[i]` describes (dense SwiGLU or
MoE). Tensor names are those of `docs/artifact-format.md`, so `state_dict()` of this
module and the artifact's safetensors agree key for key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.model.config import DenseFFNSpec, FFNSpec, LayerSpec, ModelConfig, MoEFFNSpec
from moecompose.model.moe import DISPATCHES, Dispatch, GroupedExperts, MoEFFN
from moecompose.model.parts import Attention, RMSNorm, RotaryEmbedding, SwiGLU, padding_mask


def _dense_ffn(config: ModelConfig, spec: DenseFFNSpec, dispatch: Dispatch) -> nn.Module:
    return SwiGLU(config.hidden_size, config.intermediate_size)


def _moe_ffn(config: ModelConfig, spec: MoEFFNSpec, dispatch: Dispatch) -> nn.Module:
    return MoEFFN(config.hidden_size, spec, dispatch)


FFN_BUILDERS: dict[str, Callable[[ModelConfig, Any, Dispatch], nn.Module]] = {
    DenseFFNSpec.kind: _dense_ffn,
    MoEFFNSpec.kind: _moe_ffn,
}


def build_ffn(config: ModelConfig, spec: FFNSpec, dispatch: Dispatch) -> nn.Module:
    return FFN_BUILDERS[spec.kind](config, spec, dispatch)


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


class CausalLMOutput(NamedTuple):
    """logits [B, S, V]; aux_loss: weighted auxiliary losses summed over MoE layers, fp32 []."""

    logits: Tensor
    aux_loss: Tensor


class DecoderLayer(nn.Module):
    """Sequential (Llama): `h = x + attn(n1(x)); y = h + ffn(n2(h))`.
    Parallel (GPT-J, BAM): `y = x + attn(n1(x)) + ffn(n2(x))`.
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec, dispatch: Dispatch) -> None:
        super().__init__()
        d = config.hidden_size
        self.parallel = config.block == "parallel"
        self.self_attn = Attention(
            d,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            bias=config.attention_bias,
        )
        self.mlp = build_ffn(config, spec.ffn, dispatch)
        self.routed = isinstance(self.mlp, MoEFFN)
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, S, d] -> (x [B, S, d], this layer's aux loss or None)."""
        if self.parallel:
            attn = self.self_attn(self.input_layernorm(x), cos, sin, mask)
            ffn, aux = self._ffn(self.post_attention_layernorm(x))
            return x + attn + ffn, aux
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        ffn, aux = self._ffn(self.post_attention_layernorm(x))
        return x + ffn, aux

    def _ffn(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.routed:
            return self.mlp(x)
        return self.mlp(x), None


class Decoder(nn.Module):
    """Embeddings, decoder layers and the final norm: the `model.` prefix of tensor names."""

    def __init__(self, config: ModelConfig, dispatch: Dispatch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, dispatch) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """input_ids [B, S] -> (hidden [B, S, d], aux loss [])."""
        x = self.embed_tokens(input_ids)  # [B, S, d]
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # [S]
        else:
            position_ids = position_ids[:, None]  # [B, 1, S]: broadcast over heads
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # [S, dh] or [B, 1, S, dh]
        mask = None if attention_mask is None else padding_mask(attention_mask)  # [B, 1, S, S]
        aux = torch.zeros((), device=x.device)
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin, mask)
            if layer_aux is not None:
                aux = aux + layer_aux
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
        for p in self.parameters():
            p.data = p.data.to(config.torch_dtype)
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
    ) -> CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding); position_ids [B, S]."""
        h, aux = self.model(input_ids, attention_mask, position_ids)  # [B, S, d]
        if self.lm_head is None:
            logits = F.linear(h, self.model.embed_tokens.weight)  # [B, S, V]
        else:
            logits = self.lm_head(h)
        return CausalLMOutput(logits, aux)

    def set_dispatch(self, dispatch: Dispatch) -> None:
        """Switch every MoE layer between the `"grouped"` and the `"loop"` expert kernels."""
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                module.dispatch = dispatch

    def load_weights(
        self, state_dict: Mapping[str, Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copy tensors into the parameters (cast to their dtype); returns (missing, unexpected).

        Raises `ValueError` naming the tensors: with `strict`, for any missing or unexpected
        name; always, for a shape that differs from the config's.
        """
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
        with torch.no_grad():
            for name, tensor in own.items():
                if name in state_dict:
                    tensor.copy_(state_dict[name])
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

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
