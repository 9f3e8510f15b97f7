"""ModelConfig parsing and MoECausalLM construction, loading, trainability and block forms."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from moecompose.model import CausalLMOutput, ModelConfig, MoECausalLM
from moecompose.model.parts import sequence_mask

DENSE = {"ffn": {"kind": "dense"}}
MOE = {
    "ffn": {
        "kind": "moe",
        "num_experts": 4,
        "intermediate_size": 32,
        "router": {"kind": "topk", "k": 2, "normalize": True},
        "shared_expert": {"intermediate_size": 16, "gate": True},
        "aux_loss": {"load_balance": 0.01, "z_loss": 0.001},
    }
}
MOA = {"kind": "moa", "num_experts": 3, "share": [], "router": {"kind": "soft"}}


def config_dict(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model_type": "moecompose",
        "architectures": ["MoECausalLM"],
        "moecompose_format": 1,
        "family": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 128,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "qk_norm": None,
        "norm_placement": "pre",
        "norm_unit_offset": False,
        "scale_embeddings": False,
        "query_pre_attn_scalar": None,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "layer_types": None,
        "rope_local_base_freq": None,
        "block": "sequential",
        "dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "layers": [copy.deepcopy(DENSE), copy.deepcopy(MOE)],
        "trainable": None,
    }
    d.update(overrides)
    return d


def ids(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("window", [None, 16])
def test_config_round_trips_through_dict(window: int | None) -> None:
    d = config_dict(extra_provenance={"spec_hash": "abc"}, sliding_window=window)
    config = ModelConfig.from_dict(d)
    assert config.to_dict() == d
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_attention_descriptors_round_trip() -> None:
    d = config_dict()
    d["layers"][0]["attention"] = {**MOA, "share": ["v", "k"]}
    d["layers"][1]["attention"] = {"kind": "dense"}
    config = ModelConfig.from_dict(d)
    assert config.layers[0].attention.shared_kv
    assert config.layers[1].attention.kind == "dense"
    assert config.to_dict()["layers"][0]["attention"]["share"] == ["k", "v"]
    assert "attention" not in config.to_dict()["layers"][1]
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_rope_scaling_in_rope_parameters_form_is_accepted() -> None:
    scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config = ModelConfig.from_dict(config_dict(rope_scaling=scaling))
    assert config.rope_scaling is not None and config.rope_scaling.factor == 2.0
    default = {"rope_type": "default", "rope_theta": 10000.0}
    assert ModelConfig.from_dict(config_dict(rope_scaling=default)).rope_scaling is None


def test_unknown_router_kind_is_rejected_by_name() -> None:
    d = config_dict()
    d["layers"][1]["ffn"]["router"]["kind"] = "expert_choice"
    with pytest.raises(ValueError, match="router kind 'expert_choice' is not supported by this"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["layers"][0]["ffn"].update(kind="adapter"), "ffn kind 'adapter'"),
        (
            lambda d: d["layers"][0].update(attention={"kind": "soft"}),
            "layers\\[0\\].attention: attention kind 'soft' is not supported",
        ),
        (
            lambda d: d["layers"][0].update(attention={**MOA, "share": ["k"]}),
            "layers\\[0\\].attention.share",
        ),
        (
            lambda d: d["layers"][0].update(attention={**MOA, "router": {"kind": "expert"}}),
            "router kind 'expert'",
        ),
        (
            lambda d: d["layers"][0].update(attention={**MOA, "router": {"kind": "topk", "k": 4}}),
            "exceeds num_experts",
        ),
        (lambda d: d["layers"][1]["ffn"]["router"].update(kind="soft"), "router kind 'soft'"),
        (lambda d: d["layers"][1]["ffn"].update(top_k=2), "unknown key"),
        (lambda d: d["layers"][1]["ffn"]["router"].update(k=5), "exceeds num_experts"),
        (lambda d: d.update(block="diagonal"), "block 'diagonal'"),
        (lambda d: d.update(num_hidden_layers=3), "num_hidden_layers is 3"),
        (lambda d: d.update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
        (lambda d: d.update(rope_scaling={"rope_type": "linear", "factor": 0}), "positive"),
        (
            lambda d: d.update(
                rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}
            ),
            "differs from rope_theta",
        ),
        (
            lambda d: d.update(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}),
            "unknown key",
        ),
        (lambda d: d.update(moecompose_format=2), "moecompose_format 2"),
        (lambda d: d.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (lambda d: d.update(dtype="float64"), "dtype 'float64'"),
        (lambda d: d.update(sliding_window=0), "sliding_window must be a positive integer"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (lambda d: d.update(layer_types=["full_attention"]), "layer_types has 1 entries"),
        (lambda d: d.update(rope_local_base_freq=10.0), "rope_local_base_freq needs layer_types"),
        (lambda d: d.update(attn_logit_softcapping=0), "attn_logit_softcapping must be positive"),
        (lambda d: d["layers"][1]["ffn"].pop("num_experts"), "missing required key 'num_experts'"),
    ],
)
def test_invalid_configs_fail_naming_the_field(mutate: Any, message: str) -> None:
    d = config_dict()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d)


# --------------------------------------------------------------------------- model


def test_state_dict_names_follow_the_artifact_format() -> None:
    model = MoECausalLM.from_config(config_dict())
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == (64, 32)
    assert shapes["lm_head.weight"] == (64, 32)
    assert shapes["model.norm.weight"] == (32,)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32, 32)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 32)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (48, 32)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 48)
    assert shapes["model.layers.1.mlp.router.weight"] == (4, 32)
    assert shapes["model.layers.1.mlp.experts.gate_proj"] == (4, 32, 32)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (4, 32, 32)
    assert shapes["model.layers.1.mlp.shared_expert.up_proj.weight"] == (16, 32)
    assert shapes["model.layers.1.mlp.shared_expert_gate.weight"] == (1, 32)
    assert not any(name.endswith(".bias") for name in shapes)
    assert len(shapes) == 1 + 2 + 2 * (2 + 4) + 3 + (1 + 3 + 3 + 1)


def test_forward_returns_logits_and_summed_aux_loss() -> None:
    model = MoECausalLM.from_config(config_dict(layers=[copy.deepcopy(MOE), copy.deepcopy(MOE)]))
    out = model(ids(3, 7))
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (3, 7, 64)
    layer_losses = []
    h = model.model.embed_tokens(ids(3, 7))
    pos = torch.arange(7)
    cos, sin = model.model.rotary_emb(pos, h.dtype)
    for layer in model.model.layers:
        h, aux = layer(h, cos, sin, None)
        layer_losses.append(aux)
    torch.testing.assert_close(out.aux_loss, sum(layer_losses))
    assert out.aux_loss.item() > 0


def test_dense_model_aux_loss_is_a_zero_scalar() -> None:
    out = MoECausalLM.from_config(config_dict(layers=[DENSE, DENSE]))(ids())
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0


def test_load_weights_names_missing_and_unexpected_tensors() -> None:
    model = MoECausalLM.from_config(config_dict())
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.router.weight"]
    state["model.layers.1.mlp.gate.weight"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="missing tensors") as error:
        model.load_weights(state)
    assert "model.layers.1.mlp.router.weight" in str(error.value)
    assert "model.layers.1.mlp.gate.weight" in str(error.value)
    missing, unexpected = model.load_weights(state, strict=False)
    assert missing == ["model.layers.1.mlp.router.weight"]
    assert unexpected == ["model.layers.1.mlp.gate.weight"]


def test_load_weights_rejects_wrong_shapes() -> None:
    model = MoECausalLM.from_config(config_dict())
    state = dict(model.state_dict())
    state["model.layers.1.mlp.experts.up_proj"] = torch.zeros(3, 32, 32)
    with pytest.raises(
        ValueError, match=r"experts.up_proj: expected \(4, 32, 32\), got \(3, 32, 32\)"
    ):
        model.load_weights(state)


def test_load_weights_copies_values() -> None:
    source = MoECausalLM.from_config(config_dict())
    target = MoECausalLM.from_config(config_dict())
    target.load_weights(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(ids()).logits, source(ids()).logits, atol=0, rtol=0)


def test_only_listed_tensors_are_trainable() -> None:
    names = ["model.layers.1.mlp.router.weight", "model.layers.1.mlp.experts.up_proj"]
    model = MoECausalLM.from_config(config_dict(trainable=names))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(names)
    assert len(model.trainable_parameters()) == 2
    out = model(ids())
    (out.logits.sum() + out.aux_loss).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_trainable_null_makes_everything_trainable() -> None:
    model = MoECausalLM.from_config(config_dict())
    assert len(model.trainable_parameters()) == len(list(model.parameters()))


def test_trainable_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.router\.weight"):
        MoECausalLM.from_config(config_dict(trainable=["model.layers.9.mlp.router.weight"]))


def test_parameters_take_the_config_dtype() -> None:
    model = MoECausalLM.from_config(config_dict(dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model(ids()).logits.dtype == torch.bfloat16


def test_parallel_block_feeds_both_branches_the_same_residual() -> None:
    torch.manual_seed(0)
    model = MoECausalLM.from_config(
        config_dict(block="parallel", num_hidden_layers=1, layers=[DENSE])
    )
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    cos, sin = model.model.rotary_emb(torch.arange(5), x.dtype)
    expected = (
        x
        + layer.self_attn(layer.input_layernorm(x), cos, sin, None)
        + layer.mlp(layer.post_attention_layernorm(x))
    )
    torch.testing.assert_close(layer(x, cos, sin, None)[0], expected)

    sequential = MoECausalLM.from_config(config_dict(num_hidden_layers=1, layers=[DENSE]))
    sequential.load_weights(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(sequential(ids()).logits, model(ids()).logits)


def test_set_dispatch_switches_every_moe_layer() -> None:
    model = MoECausalLM.from_config(config_dict(layers=[copy.deepcopy(MOE), copy.deepcopy(MOE)]))
    with torch.no_grad():
        grouped = model(ids()).logits
        model.set_dispatch("loop")
        loop = model(ids()).logits
    assert all(layer.mlp.experts.dispatch == "loop" for layer in model.model.layers)
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dispatch"):
        model.set_dispatch("fast")


def test_explicit_positions_match_default_positions() -> None:
    model = MoECausalLM.from_config(config_dict())
    x = ids(2, 6)
    with torch.no_grad():
        default = model(x).logits
        explicit = model(x, position_ids=torch.arange(6).expand(2, 6)).logits
    torch.testing.assert_close(default, explicit)


def test_sequence_mask_is_built_only_when_the_window_hides_a_key() -> None:
    """No padding, no cache: None (the causal fast path) while every key is within the
    window; past it, token t sees positions t-W+1 .. t."""
    cpu = torch.device("cpu")
    assert sequence_mask(7, cpu, None) is None
    assert sequence_mask(5, cpu, 5) is None
    mask = sequence_mask(7, cpu, 5)
    assert mask is not None and mask.shape == (1, 1, 7, 7)
    expected = torch.tensor([[0 <= t - k < 5 for k in range(7)] for t in range(7)])
    assert torch.equal(mask[0, 0], expected)


def reference_softcapped_attention(q, k, v, mask, scale, cap):  # type: ignore[no-untyped-def]
    """Hugging Face's eager Gemma 2 attention (softmax in fp64 for fp64 inputs), for
    autograd to differentiate."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = torch.tanh(q @ k.transpose(-2, -1) * scale / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=q.dtype) @ v


@pytest.mark.parametrize("kind", ["causal", "padded", "every key"])
def test_softcapped_attention_and_its_backward_follow_the_formula(kind: str) -> None:
    """Gemma 2's soft-capped scores: the op (forward and hand-written backward) against
    autograd through the formula, in fp64, grouped-query, for each kind of `Mask`: causal,
    a tensor (padding), and none (every key); its fake and autograd registrations agree
    (`opcheck`)."""
    from moecompose.model.parts import ALL_KEYS, attend, causal_mask
    from moecompose.model.softcapped_attention import _softcapped_attention

    torch.manual_seed(0)
    B, hq, hkv, S, dh = 2, 4, 2, 6, 8
    q = torch.randn(B, hq, S, dh, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, hkv, S, dh, dtype=torch.float64, requires_grad=True) for _ in "kv")
    keep = torch.ones(B, S, dtype=torch.long)
    keep[0, :2] = 0
    padded = causal_mask(S, 0, keep, q.device)
    mask = {"causal": None, "padded": padded, "every key": ALL_KEYS}[kind]
    reference_mask = {"causal": causal_mask(S, 0, None, q.device), "padded": padded,
                      "every key": torch.ones(S, S, dtype=torch.bool)}[kind]
    upstream = torch.randn(B, hq, S, dh, dtype=torch.float64)
    results = []
    for run in (lambda: attend(q, k, v, mask, 0.3, 2.0),
                lambda: reference_softcapped_attention(q, k, v, reference_mask, 0.3, 2.0)):
        out = run()
        grads = torch.autograd.grad(out, (q, k, v), upstream)
        results.append((out, *grads))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    tensor_mask = mask if isinstance(mask, torch.Tensor) else None
    torch.library.opcheck(_softcapped_attention, (q, k, v, tensor_mask, mask is None, 0.3, 2.0))
