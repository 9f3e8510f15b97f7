"""PESC adapter experts: dense parity at zero up-projections, grouped vs loop, trainable sets."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
from helpers import assert_compiled_inference_matches_eager, assert_compiled_training_matches_eager
from torch._dynamo.utils import counters

from moecompose.model import MoECausalLM
from moecompose.model.adapters import AdapterMoEFFN, grouped_linear
from moecompose.model.compile import supports_shapes_spec
from moecompose.model.config import AdapterFFNConfig, AuxLossConfig, ModelConfig, TopKRouterConfig

DIM, HIDDEN, RANK = 16, 24, 6


def adapter_layer(
    num_experts: int = 4, k: int = 2, ffn: int = 96, dropout: float = 0.0, **overrides: Any
) -> dict[str, Any]:
    ffn_cfg = {
        "kind": "adapters",
        "num_experts": num_experts,
        "intermediate_size": ffn,
        "bottleneck": 8,
        "scale": 0.25,
        "activation": "gelu",
        "dropout": dropout,
        "router": {"kind": "topk", "k": k, "normalize": True},
        "aux_loss": {"load_balance": 0.01, "z_loss": 0.001},
    }
    ffn_cfg.update(overrides)
    return {"ffn": ffn_cfg}


def adapter_spec(num_experts: int, k: int, activation: str = "gelu") -> AdapterFFNConfig:
    return AdapterFFNConfig(
        num_experts=num_experts,
        intermediate_size=HIDDEN,
        bottleneck=RANK,
        router=TopKRouterConfig(k=k, normalize=True),
        scale=0.5,
        activation=activation,
        aux_loss=AuxLossConfig(load_balance=0.01, z_loss=0.001),
    )


# --------------------------------------------------------------------------- dense parity


@pytest.mark.parametrize(("num_experts", "k"), [(1, 1), (4, 1), (4, 2)])
def test_zero_up_projections_reproduce_hf_llama_logits(num_experts: int, k: int) -> None:
    from test_model_hf_parity import hf_model, hf_state_dict, native_config, tokens

    hf = hf_model("llama")
    layers = [adapter_layer(num_experts, k, dropout=0.1)] * hf.config.num_hidden_layers
    model = MoECausalLM.from_config(native_config(hf, layers)).eval()
    state = hf_state_dict(hf)
    generator = torch.Generator().manual_seed(1)
    for i in range(hf.config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        d = hf.config.hidden_size
        state[prefix + "router.weight"] = torch.randn(num_experts, d, generator=generator)
        state[prefix + "adapters.down_proj"] = torch.randn(num_experts, 8, d, generator=generator)
        state[prefix + "adapters.up_proj"] = torch.zeros(num_experts, d, 8)
    model.load_weights(state)
    ids = tokens()
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_fresh_adapter_layer_adds_nothing_to_the_shared_ffn() -> None:
    torch.manual_seed(0)
    layer = AdapterMoEFFN(DIM, adapter_spec(4, 2))
    x = torch.randn(3, 5, DIM)
    y, aux = layer(x)
    dense = layer.down_proj(torch.nn.functional.silu(layer.gate_proj(x)) * layer.up_proj(x))
    assert torch.equal(y, dense)
    assert aux.item() > 0


# --------------------------------------------------------------------------- grouped vs loop


def grads_of(layer: AdapterMoEFFN, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    torch.autograd.backward((y, aux), (upstream, torch.ones_like(aux)))
    out = {name: p.grad for name, p in layer.named_parameters()}
    out.update(x=x.grad, y=y.detach(), aux=aux.detach())
    return out


@pytest.mark.parametrize(
    ("num_experts", "k", "tokens", "activation"),
    [(6, 2, 37, "gelu"), (4, 1, 50, "relu"), (5, 3, 20, "silu"), (16, 2, 3, "gelu")],
)
def test_grouped_adapters_match_loop_forward_and_gradients(
    num_experts: int, k: int, tokens: int, activation: str
) -> None:
    torch.manual_seed(0)
    grouped = AdapterMoEFFN(DIM, adapter_spec(num_experts, k, activation), dispatch="grouped")
    with torch.no_grad():
        grouped.adapters.up_proj.normal_()
    loop = AdapterMoEFFN(DIM, adapter_spec(num_experts, k, activation), dispatch="loop")
    loop.load_state_dict(grouped.state_dict())
    x, upstream = torch.randn(tokens, DIM), torch.randn(tokens, DIM)
    fast, reference = grads_of(grouped, x, upstream), grads_of(loop, x, upstream)
    assert fast.keys() == reference.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], atol=1e-5, rtol=0, msg=name)


def test_grouped_linear_matches_per_expert_matmuls_and_zeroes_unused_experts() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 2, 0])
    x = torch.randn(5, 7, requires_grad=True)
    weight = torch.randn(4, 3, 7, requires_grad=True)
    y = grouped_linear(x, counts, weight)
    expected = torch.cat([x[:3] @ weight[0].t(), x[3:] @ weight[2].t()])
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert not weight.grad[1].any() and not weight.grad[3].any()
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    torch.cat([x2[:3] @ w2[0].t(), x2[3:] @ w2[2].t()]).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_dropout_acts_only_in_training() -> None:
    torch.manual_seed(0)
    spec = AdapterFFNConfig(
        num_experts=2,
        intermediate_size=HIDDEN,
        bottleneck=RANK,
        router=TopKRouterConfig(k=1),
        dropout=0.5,
    )
    layer = AdapterMoEFFN(DIM, spec)
    with torch.no_grad():
        layer.adapters.up_proj.normal_()
    x = torch.randn(40, DIM)
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


# --------------------------------------------------------------------------- config, trainable


CONFIG: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "layers": [{"ffn": {"kind": "dense"}}, adapter_layer(4, 2, ffn=48)],
}


def test_adapter_config_round_trips() -> None:
    config = ModelConfig.from_dict(copy.deepcopy(CONFIG))
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["layers"][1] == CONFIG["layers"][1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": "tanh"}, "activation 'tanh' is not supported"),
        ({"router": {"kind": "token_mixing", "group_size": 2}}, "router kind 'token_mixing'"),
        ({"router": {"kind": "topk", "k": 5}}, "exceeds num_experts"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"rank": 4}, "unknown key"),
    ],
)
def test_bad_adapter_config_names_the_field(change: dict[str, Any], message: str) -> None:
    config = copy.deepcopy(CONFIG)
    config["layers"][1]["ffn"].update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(config)


def test_unknown_ffn_kind_is_a_clear_error() -> None:
    config = copy.deepcopy(CONFIG)
    config["layers"][1] = {"ffn": {"kind": "lora_experts"}}
    with pytest.raises(ValueError, match=r"ffn kind 'lora_experts' is not supported"):
        ModelConfig.from_dict(config)


def test_trainable_router_and_adapters_get_gradients_and_nothing_else() -> None:
    names = [
        "model.layers.1.mlp.router.weight",
        "model.layers.1.mlp.adapters.down_proj",
        "model.layers.1.mlp.adapters.up_proj",
    ]
    torch.manual_seed(0)
    model = MoECausalLM.from_config({**copy.deepcopy(CONFIG), "trainable": names})
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert len(model.trainable_parameters()) == 3
    out = model(torch.randint(0, 64, (2, 7)))
    (out.logits.square().mean() + out.aux_loss).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(names)
    assert model.model.layers[1].mlp.adapters.up_proj.grad.abs().sum() > 0


# --------------------------------------------------------------------------- compile

needs_shapes_spec = pytest.mark.skipif(
    not supports_shapes_spec(), reason="shape-stable compile needs torch.compile(shapes_spec=)"
)


def ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))


@pytest.fixture
def model() -> MoECausalLM:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MoECausalLM.from_config(copy.deepcopy(CONFIG))
    with torch.no_grad():
        model.model.layers[1].mlp.adapters.up_proj.normal_()
    return model


@pytest.mark.slow
def test_adapter_model_has_no_graph_breaks(model: MoECausalLM) -> None:
    explanation = torch._dynamo.explain(model)(ids(2, 7))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_adapter_model_does_not_recompile(model: MoECausalLM) -> None:
    shapes = [(batch, seq) for batch in (1, 2, 3) for seq in (1, 7, 64)]
    assert_compiled_inference_matches_eager(model, shapes, ids)


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_adapter_training_step_matches_eager(model: MoECausalLM) -> None:
    assert_compiled_training_matches_eager(model, [(2, 7), (1, 1), (3, 33)], ids)
