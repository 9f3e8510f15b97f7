"""Mixture of Tokens: group semantics, causality, padding, transition to top-1, compile."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
from helpers import (
    assert_compiled_inference_matches_eager,
    assert_compiled_training_matches_eager,
    training_grads,
)
from torch._dynamo.utils import counters

from moecompose.model import ModelConfig, MoECausalLM
from moecompose.model.compile import supports_shapes_spec
from moecompose.model.config import MoEFFNConfig, TokenMixingRouterConfig
from moecompose.model.moe import MoEFFN
from moecompose.model.parts import swiglu
from moecompose.model.token_mixing import TokenMixingFFN

DIM, HIDDEN = 16, 12


def mot_spec(
    num_experts: int = 4, group: int = 2, temperature: float = 0.7, learn: bool = False
) -> MoEFFNConfig:
    return MoEFFNConfig(
        num_experts=num_experts,
        intermediate_size=HIDDEN,
        router=TokenMixingRouterConfig(
            group_size=group, temperature=temperature, learn_temperature=learn
        ),
    )


def reference(layer: TokenMixingFFN, x: torch.Tensor) -> torch.Tensor:
    """The formula, one group and one position at a time; the last group is just smaller."""
    B, S, _ = x.shape
    G, E = layer.router.group_size, layer.num_experts
    c, T, ex = layer.router.weight, layer.router.temperature, layer.experts
    y = torch.zeros_like(x)
    for start in range(0, B, G):
        rows = list(range(start, min(start + G, B)))
        for s in range(S):
            xs = x[rows, s]  # [g, d]
            w = (xs @ c.t() / T).softmax(dim=0)  # [g, E]
            for e in range(E):
                mixed = (w[:, e, None] * xs).sum(dim=0, keepdim=True)  # [1, d]
                out = swiglu(mixed, ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e])
                y[rows, s] += w[:, e, None] * out[0]
    return y


def layer_of(spec: MoEFFNConfig) -> TokenMixingFFN:
    torch.manual_seed(0)
    return TokenMixingFFN(DIM, spec)


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize(("batch", "group"), [(4, 2), (5, 2), (7, 3), (2, 4), (3, 1)])
def test_layer_matches_the_per_group_formula(batch: int, group: int) -> None:
    layer = layer_of(mot_spec(group=group))
    x = torch.randn(batch, 5, DIM)
    y, aux = layer(x)
    torch.testing.assert_close(y, reference(layer, x), atol=1e-5, rtol=1e-5)
    assert aux.item() == 0


def test_gradients_match_the_formula_including_a_learned_temperature() -> None:
    layer = layer_of(mot_spec(group=2, learn=True))
    x = torch.randn(3, 4, DIM)
    upstream = torch.randn(3, 4, DIM)
    grads = []
    for run in (lambda: layer(x)[0], lambda: reference(layer, x)):
        layer.zero_grad()
        run().backward(upstream)
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert grads[0]["router.temperature"].abs() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5)


def test_mixing_weights_sum_to_one_over_the_group_and_padding_gets_none() -> None:
    layer = layer_of(mot_spec(group=3))
    x = torch.randn(2, 3, DIM)  # two groups of three tokens
    real = torch.tensor([[True, True, True], [True, False, False]])
    w = layer.router(x, real)  # [M, G, E]
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 4))
    assert not w[1, 1:].any()
    assert torch.equal(w[1, 0], torch.ones(4))


def test_group_of_one_real_row_equals_that_row_alone_and_sums_all_experts() -> None:
    layer = layer_of(mot_spec(group=2))
    x = torch.randn(3, 6, DIM)
    with torch.no_grad():
        three = layer(x)[0]
        alone = layer(x[2:])[0]
        ex = layer.experts
        every = sum(
            swiglu(x[2], ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e]) for e in range(4)
        )
    torch.testing.assert_close(three[2:], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone[0], every, atol=1e-5, rtol=0)


def test_learned_temperature_is_a_tensor_only_when_asked_for() -> None:
    fixed = layer_of(mot_spec(temperature=0.5))
    learned = layer_of(mot_spec(temperature=0.5, learn=True))
    assert "router.temperature" not in fixed.state_dict()
    assert learned.state_dict()["router.temperature"].shape == ()
    assert learned.state_dict()["router.temperature"].item() == 0.5
    x = torch.randn(2, 3, DIM)
    torch.testing.assert_close(fixed(x)[0], learned(x)[0])


# --------------------------------------------------------------------------- the model

MOT = {
    "ffn": {
        "kind": "moe",
        "num_experts": 4,
        "intermediate_size": 16,
        "router": {"kind": "token_mixing", "group_size": 2, "temperature": 0.7},
        "shared_expert": None,
        "aux_loss": {"load_balance": 0.01, "z_loss": 0.0},
    }
}
CONFIG: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "layers": [{"ffn": {"kind": "dense"}}, MOT, MOT],
}


def make_model(**router: Any) -> MoECausalLM:
    config = copy.deepcopy(CONFIG)
    for layer in config["layers"][1:]:
        layer["ffn"]["router"].update(router)
    torch.manual_seed(0)
    return MoECausalLM.from_config(config)


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * seed + batch * seq)
    return torch.randint(0, 64, (batch, seq), generator=generator)


@pytest.mark.parametrize("batch", [4, 5])
def test_future_tokens_of_any_sequence_never_change_earlier_outputs(batch: int) -> None:
    model = make_model()
    tokens = ids(batch, 12)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        base = model(tokens).logits
        for t in (0, 5, 10):
            for row in range(batch):  # the future of one sequence only, then of all
                for rows in ([row], list(range(batch))):
                    changed = tokens.clone()
                    changed[rows, t + 1 :] = torch.randint(
                        0, 64, (len(rows), 11 - t), generator=gen
                    )
                    out = model(changed).logits
                    assert torch.equal(out[:, : t + 1], base[:, : t + 1]), (t, rows)


def test_padding_never_changes_real_rows() -> None:
    model = make_model()
    tokens = ids(3, 9)
    with torch.no_grad():
        three = model(tokens).logits  # groups {0, 1} and {2, padding}
        pair = model(tokens[:2]).logits
        alone = model(tokens[2:]).logits
    torch.testing.assert_close(three[:2], pair, atol=1e-6, rtol=0)
    torch.testing.assert_close(three[2:], alone, atol=1e-6, rtol=0)


def test_rows_of_other_groups_do_not_interact() -> None:
    model = make_model()
    tokens = ids(4, 6)
    changed = tokens.clone()
    changed[2:] = ids(2, 6, seed=1)
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    assert torch.equal(a[:2], b[:2])
    assert not torch.equal(a[2:], b[2:])


def test_token_mixing_config_round_trips_and_rejects_bad_fields() -> None:
    config = ModelConfig.from_dict(copy.deepcopy(CONFIG))
    assert ModelConfig.from_dict(config.to_dict()) == config
    for change, message in [
        ({"k": 1}, "unknown key"),
        ({"temperature": 0}, "temperature must be positive"),
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"kind": "expert_choice"}, "router kind 'expert_choice' is not supported"),
    ]:
        bad = copy.deepcopy(CONFIG)
        bad["layers"][1]["ffn"]["router"].update(change)
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict(bad)


def test_trainable_controller_and_temperature() -> None:
    config = copy.deepcopy(CONFIG)
    config["layers"][1]["ffn"]["router"]["learn_temperature"] = True
    names = ["model.layers.1.mlp.router.weight", "model.layers.1.mlp.router.temperature"]
    config["trainable"] = names
    model = MoECausalLM.from_config(config)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    model(ids(2, 5)).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


# --------------------------------------------------------------------------- transition


def test_transition_gives_a_top1_model_that_runs_on_one_sequence() -> None:
    model = make_model(learn_temperature=True)
    trainable = [
        "model.layers.1.mlp.router.weight",
        "model.layers.1.mlp.router.temperature",
        "model.layers.2.mlp.experts.up_proj",
    ]
    model.set_trainable(trainable)
    model.config = ModelConfig.from_dict({**model.config.to_dict(), "trainable": trainable})
    with torch.no_grad():
        model.model.layers[1].mlp.router.temperature.fill_(0.5)
    controller = model.model.layers[1].mlp.router.weight.detach().clone()
    experts = model.model.layers[1].mlp.experts

    config = model.transition_to_topk()

    router = config["layers"][1]["ffn"]["router"]
    assert router == {"kind": "topk", "k": 1, "normalize": True}
    assert config["trainable"] == [trainable[0], trainable[2]]
    layer = model.model.layers[1].mlp
    assert isinstance(layer, MoEFFN) and layer.experts is experts
    torch.testing.assert_close(layer.router.weight, controller / 0.5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        trainable[0],
        trainable[2],
    }
    x = torch.randn(7, 32)
    with torch.no_grad():
        y, _ = layer(x)
        choice = (x @ controller.t()).argmax(dim=-1)
        for t in range(7):
            e = choice[t]
            expected = swiglu(
                x[t : t + 1], experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e]
            )
            torch.testing.assert_close(y[t : t + 1], expected, atol=1e-6, rtol=1e-5)

    # The returned config describes the transitioned model, and batch 1 works.
    reloaded = MoECausalLM.from_config(config)
    reloaded.load_weights(model.state_dict())
    one = ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(one).logits, model(one).logits)
        batch = ids(3, 9)
        torch.testing.assert_close(
            model(batch).logits[:1], model(batch[:1]).logits, atol=1e-5, rtol=0
        )


# --------------------------------------------------------------------------- compile

needs_shapes_spec = pytest.mark.skipif(
    not supports_shapes_spec(), reason="shape-stable compile needs torch.compile(shapes_spec=)"
)


@pytest.fixture
def fresh() -> MoECausalLM:
    torch._dynamo.reset()
    counters.clear()
    return make_model(learn_temperature=True)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_mixture_of_tokens_has_no_graph_breaks(fresh: MoECausalLM, batch: int) -> None:
    explanation = torch._dynamo.explain(fresh)(ids(batch, 7))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_mixture_of_tokens_does_not_recompile(fresh: MoECausalLM) -> None:
    shapes = [(batch, seq) for batch in (1, 2, 3, 4, 5) for seq in (1, 7, 64)]
    assert_compiled_inference_matches_eager(fresh, shapes, ids)


@pytest.mark.slow
def test_compiled_mixture_of_tokens_training_step_matches_eager(fresh: MoECausalLM) -> None:
    compiled = torch.compile(fresh, fullgraph=True, dynamic=True)
    for batch, seq in [(2, 7), (1, 1), (5, 33), (3, 8)]:
        x = ids(batch, seq)
        fast, slow = training_grads(compiled, fresh, x), training_grads(fresh, fresh, x)
        for name in slow:
            torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@needs_shapes_spec
def test_compile_model_training_step_of_mixture_of_tokens(fresh: MoECausalLM) -> None:
    """Training through `compile_model`: the gradients of eager, one graph for every
    batch and length (padding groups or not, length 1 included)."""
    assert_compiled_training_matches_eager(fresh, [(2, 7), (1, 1), (5, 33), (3, 8)], ids)


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_transitioned_model_does_not_recompile(fresh: MoECausalLM) -> None:
    fresh.transition_to_topk()
    assert_compiled_inference_matches_eager(fresh, [(1, 1), (1, 7), (2, 64), (3, 7)], ids)
