"""MoECausalLM reproduces Hugging Face dense models, and identical experts reproduce them too."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moecompose.model import MoECausalLM

transformers = pytest.importorskip("transformers")

VOCAB, DIM, FFN, LAYERS, HEADS, KV_HEADS = 128, 64, 96, 2, 4, 2


def hf_model(family: str = "llama", **overrides: Any) -> Any:
    """A tiny randomly initialised fp32 HF causal LM in eval mode."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    return model


def native_config(hf: Any, layers: list[dict] | None = None) -> dict[str, Any]:
    c = hf.config
    rope = dict(getattr(c, "rope_parameters", None)  # transformers 5; 4.x: theta + scaling
                or {"rope_theta": c.rope_theta,
                    **(getattr(c, "rope_scaling", None) or {"rope_type": "default"})})
    theta = rope.pop("rope_theta")
    return {
        "model_type": "moecompose",
        "moecompose_format": 1,
        "family": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.hidden_size // c.num_attention_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "max_position_embeddings": c.max_position_embeddings,
        "sliding_window": getattr(c, "sliding_window", None),
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.model_type == "qwen2",
        "block": "sequential",
        "dtype": "float32",
        "layers": layers or [{"ffn": {"kind": "dense"}}] * c.num_hidden_layers,
        "trainable": None,
    }


def hf_state_dict(hf: Any) -> dict[str, torch.Tensor]:
    state = dict(hf.state_dict())
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def moe_layer(num_experts: int, k: int, normalize: bool = True) -> dict[str, Any]:
    return {
        "ffn": {
            "kind": "moe",
            "num_experts": num_experts,
            "intermediate_size": FFN,
            "router": {"kind": "topk", "k": k, "normalize": normalize},
            "shared_expert": None,
            "aux_loss": {"load_balance": 0.01, "z_loss": 0.001},
        }
    }


def upcycled_state_dict(hf: Any, num_experts: int) -> dict[str, torch.Tensor]:
    """Every dense FFN copied into `num_experts` identical experts; routers random."""
    state = hf_state_dict(hf)
    generator = torch.Generator().manual_seed(1)
    for i in range(hf.config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = state.pop(f"{prefix}{proj}.weight")
            state[f"{prefix}experts.{proj}"] = w.expand(num_experts, *w.shape).clone()
        state[f"{prefix}router.weight"] = torch.randn(num_experts, DIM, generator=generator)
    return state


def tokens(batch: int = 2, seq: int = 19) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(2))


def max_logit_diff(ours: MoECausalLM, hf: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids).logits - hf(ids).logits).abs().max().item()


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("llama", {"tie_word_embeddings": True}),
        (
            "llama",
            {
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        ("mistral", {"sliding_window": 5}),
    ],
    ids=["llama", "qwen2-qkv-bias", "tied-embeddings", "llama3-rope", "linear-rope", "window"],
)
def test_dense_config_reproduces_hf_logits(family: str, overrides: dict[str, Any]) -> None:
    hf = hf_model(family, **overrides)
    model = MoECausalLM.from_config(native_config(hf))
    model.load_weights(hf_state_dict(hf))
    assert max_logit_diff(model, hf, tokens()) <= 1e-5


def test_tied_model_has_no_lm_head_tensor() -> None:
    hf = hf_model(tie_word_embeddings=True)
    model = MoECausalLM.from_config(native_config(hf))
    assert "lm_head.weight" not in model.state_dict()


@pytest.mark.parametrize("k", [1, 2])
def test_identical_experts_reproduce_dense_logits(k: int) -> None:
    hf = hf_model()
    config = native_config(hf, layers=[moe_layer(4, k)] * LAYERS)
    model = MoECausalLM.from_config(config)
    model.load_weights(upcycled_state_dict(hf, 4))
    assert max_logit_diff(model, hf, tokens()) <= 1e-5


def test_identical_experts_without_renormalisation_change_logits() -> None:
    hf = hf_model()
    config = native_config(hf, layers=[moe_layer(4, 2, normalize=False)] * LAYERS)
    model = MoECausalLM.from_config(config)
    model.load_weights(upcycled_state_dict(hf, 4))
    assert max_logit_diff(model, hf, tokens()) > 1e-3


def test_moe_and_dense_layers_mix() -> None:
    hf = hf_model()
    config = native_config(hf, layers=[{"ffn": {"kind": "dense"}}, moe_layer(3, 2)])
    model = MoECausalLM.from_config(config)
    state = upcycled_state_dict(hf, 3)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        state[f"model.layers.0.mlp.{proj}.weight"] = state.pop(
            f"model.layers.0.mlp.experts.{proj}"
        )[0]
    del state["model.layers.0.mlp.router.weight"]
    model.load_weights(state)
    assert max_logit_diff(model, hf, tokens()) <= 1e-5


def test_loop_dispatch_reproduces_dense_logits() -> None:
    hf = hf_model()
    model = MoECausalLM.from_config(
        native_config(hf, layers=[moe_layer(4, 2)] * LAYERS), dispatch="loop"
    )
    model.load_weights(upcycled_state_dict(hf, 4))
    assert max_logit_diff(model, hf, tokens()) <= 1e-5


def test_padding_mask_leaves_real_tokens_unchanged() -> None:
    hf = hf_model()
    model = MoECausalLM.from_config(native_config(hf))
    model.load_weights(hf_state_dict(hf))
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of the second row
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_matches_hf_and_matters(padded: bool) -> None:
    """Mistral's window (5 < 19 tokens): Hugging Face's logits, with and without left
    padding; the same weights without the window give other logits."""
    hf = hf_model("mistral", sliding_window=5)
    model = MoECausalLM.from_config(native_config(hf, layers=[moe_layer(4, 2)] * LAYERS))
    model.load_weights(upcycled_state_dict(hf, 4))
    unwindowed = MoECausalLM.from_config({**native_config(hf), "sliding_window": None})
    unwindowed.load_weights(hf_state_dict(hf))
    ids = tokens()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions).logits[keep]
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits[keep]
        full = unwindowed(ids, attention_mask=mask, position_ids=positions).logits[keep]
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (full - theirs).abs().max().item() > 1e-2
