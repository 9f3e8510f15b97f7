"""The Nexus router: expert embeddings projected from frozen domain embeddings, computed
once per forward in training and cached in eval mode; the seed FFN as shared expert."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
from helpers import assert_compiled_training_matches_eager, training_grads
from torch import Tensor
from torch._dynamo.utils import counters

from moecompose.model import ModelConfig, MoECausalLM, compile_model
from moecompose.model.compile import supports_shapes_spec
from moecompose.model.config import NexusRouterConfig
from moecompose.model.moe import MoEFFN
from moecompose.model.routing import NexusRouter

DIM, EXPERTS, DOMAIN_DIM = 32, 3, 12
PREFIX = "model.layers.1.mlp.router."


def nexus_config(k: int = 1, normalize: bool = False, **overrides: Any) -> dict[str, Any]:
    """Two layers: a dense one, then a Nexus layer with the seed FFN as shared expert;
    `overrides` replace model-wide keys."""
    nexus = {
        "kind": "moe",
        "num_experts": EXPERTS,
        "intermediate_size": 40,
        "router": {"kind": "nexus", "k": k, "normalize": normalize, "domain_dim": DOMAIN_DIM},
        "shared_expert": {"intermediate_size": 48, "gate": False},
        "aux_loss": {"load_balance": 0.05, "z_loss": 0.0},
    }
    return {
        "vocab_size": 64,
        "hidden_size": DIM,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "layers": [{"ffn": {"kind": "dense"}}, {"ffn": nexus}],
        **overrides,
    }


def nexus_model(seed: int = 0, **config: Any) -> MoECausalLM:
    """A random model whose domain embeddings are loaded (they start at zero)."""
    torch.manual_seed(seed)
    model = MoECausalLM.from_config(nexus_config(**config))
    model.load_weights(
        {**model.state_dict(), PREFIX + "domain_embeddings": torch.randn(EXPERTS, DOMAIN_DIM)}
    )
    return model


def layer_of(model: MoECausalLM) -> MoEFFN:
    layer = model.model.layers[1].mlp
    assert isinstance(layer, MoEFFN) and isinstance(layer.router, NexusRouter)
    return layer


def ids(batch: int = 2, seq: int = 7) -> Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))


def routing_by_hand(router: NexusRouter, x: Tensor, k: int, normalize: bool) -> tuple[Tensor, ...]:
    """The Nexus formulas written out: weights [T, k], indices [T, k], logits [T, E]."""
    dom, w1, w2 = router.domain_embeddings, router.w1.weight, router.w2.weight
    z = dom @ w1.T  # [E, 2d]
    gate, up = z[:, :DIM], z[:, DIM:]
    e = (gate * torch.sigmoid(gate) * up) @ w2.T  # [E, d]
    logits = x @ e.T  # [T, E]
    probs = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    probs = probs / probs.sum(dim=1, keepdim=True)
    weights, indices = probs.sort(dim=1, descending=True)
    weights, indices = weights[:, :k], indices[:, :k]
    if normalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return weights, indices, logits


def count_projections(model: MoECausalLM) -> list[int]:
    """A list whose length grows by one on every call of the router's `w1`."""
    calls: list[int] = []
    layer_of(model).router.w1.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize(("k", "normalize"), [(1, False), (2, True)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_router_output_equals_the_nexus_formula(k: int, normalize: bool, mode: str) -> None:
    model = nexus_model(k=k, normalize=normalize).train(mode == "train")
    router = layer_of(model).router
    x = torch.randn(9, DIM)
    with torch.no_grad():
        weights, indices, logits = router(x)
        expected = routing_by_hand(router, x, k, normalize)
    assert weights.shape == indices.shape == (9, k) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights, expected[0], atol=1e-6, rtol=0)
    assert torch.equal(indices, expected[1])
    if not normalize:
        assert torch.all(weights.sum(dim=1) < 1)


def test_layer_output_is_shared_expert_plus_top_probability_times_top_expert() -> None:
    layer = layer_of(nexus_model().eval())
    x = torch.randn(5, DIM)
    with torch.no_grad():
        y, _ = layer(x)
        weights, indices, _ = routing_by_hand(layer.router, x, k=1, normalize=False)
        experts, shared = layer.experts, layer.shared_expert
        assert shared is not None
        for t in range(5):
            g, u = shared.gate_proj.weight @ x[t], shared.up_proj.weight @ x[t]
            expected = shared.down_proj.weight @ (g * torch.sigmoid(g) * u)
            j = indices[t, 0]
            g, u = experts.gate_proj[j] @ x[t], experts.up_proj[j] @ x[t]
            expected += weights[t, 0] * (experts.down_proj[j] @ (g * torch.sigmoid(g) * u))
            torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=0)


def test_nexus_tensor_names_follow_the_artifact_format() -> None:
    model = MoECausalLM.from_config(nexus_config())
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith(PREFIX)}
    assert shapes == {
        PREFIX + "domain_embeddings": (EXPERTS, DOMAIN_DIM),
        PREFIX + "w1.weight": (2 * DIM, DOMAIN_DIM),
        PREFIX + "w2.weight": (DIM, DIM),
    }
    assert not model.state_dict()[PREFIX + "domain_embeddings"].any()


def test_initialisation_scales() -> None:
    torch.manual_seed(0)
    router = NexusRouter(512, 4, NexusRouterConfig(domain_dim=256))
    assert router.w1.weight.std().item() == pytest.approx(256**-0.5, rel=0.02)
    assert router.w2.weight.std().item() == pytest.approx(1 / 512, rel=0.02)
    assert router.w1.weight.mean().abs().item() < 1e-3


# --------------------------------------------------------------------------- caching


def test_eval_forwards_never_run_the_projection() -> None:
    model = nexus_model()
    calls = count_projections(model)
    model.eval()
    assert len(calls) == 1  # the switch to eval fills the cache
    with torch.no_grad():
        for batch, seq in [(2, 7), (1, 1), (3, 5)]:
            model(ids(batch, seq))
    assert len(calls) == 1


def test_training_forward_runs_the_projection_once_not_per_token() -> None:
    model = nexus_model()
    calls = count_projections(model)
    for n, (batch, seq) in enumerate([(2, 7), (3, 11)], start=1):
        model(ids(batch, seq))
        assert len(calls) == n


def load_in_eval_mode(model: MoECausalLM, state: dict[str, Tensor]) -> None:
    model.load_state_dict(state)


def load_weights_then_eval(model: MoECausalLM, state: dict[str, Tensor]) -> None:
    """The order `moecompose.load` uses."""
    model.train().load_weights(state)
    model.eval()


def load_weights_in_eval_mode(model: MoECausalLM, state: dict[str, Tensor]) -> None:
    model.load_weights(state)


@pytest.mark.parametrize("load", [load_in_eval_mode, load_weights_then_eval,
                                  load_weights_in_eval_mode])
def test_eval_cache_follows_loaded_weights(load: Any) -> None:
    model = nexus_model().eval()
    router = layer_of(model).router
    x = torch.randn(6, DIM)
    before = router(x).logits
    state = model.state_dict()
    state[PREFIX + "domain_embeddings"] = torch.randn(EXPERTS, DOMAIN_DIM)
    state[PREFIX + "w2.weight"] = torch.randn(DIM, DIM) / DIM**0.5
    load(model, state)
    after = router(x).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, routing_by_hand(router, x, 1, False)[2], atol=1e-6, rtol=0)


def test_refresh_picks_up_weights_changed_in_place_in_eval_mode() -> None:
    model = nexus_model().eval()
    router = layer_of(model).router
    x = torch.randn(6, DIM)
    before = router(x).logits
    with torch.no_grad():
        router.domain_embeddings.mul_(-1)
    assert torch.equal(router(x).logits, before)  # stale until refreshed
    router.refresh()
    fresh = router(x).logits
    assert not torch.allclose(fresh, before)
    torch.testing.assert_close(fresh, routing_by_hand(router, x, 1, False)[2], atol=1e-6, rtol=0)


def test_training_reaches_the_projection_but_never_the_domain_embeddings() -> None:
    model = nexus_model()
    router = layer_of(model).router
    assert not router.domain_embeddings.requires_grad
    grads = training_grads(model, model, ids())
    assert PREFIX + "domain_embeddings" not in dict(model.named_parameters())
    assert grads[PREFIX + "w1.weight"].abs().sum() > 0
    assert grads[PREFIX + "w2.weight"].abs().sum() > 0
    assert router.domain_embeddings.grad is None
    with pytest.raises(ValueError, match="domain_embeddings"):
        model.set_trainable([PREFIX + "domain_embeddings"])


def test_bfloat16_model_routes_with_float32_logits() -> None:
    model = nexus_model(dtype="bfloat16").eval()
    router = layer_of(model).router
    x = torch.randn(4, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = router(x).logits
        out = model(ids())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert out.logits.dtype == torch.bfloat16
    assert model.state_dict()[PREFIX + "domain_embeddings"].dtype == torch.bfloat16  # as stored


# --------------------------------------------------------------------------- config


def test_nexus_config_round_trips() -> None:
    config = ModelConfig.from_dict(nexus_config(k=2, normalize=True))
    assert config.layers[1].ffn.router == NexusRouterConfig(
        domain_dim=DOMAIN_DIM, k=2, normalize=True
    )
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["layers"][1]["ffn"]["router"] == {
        "kind": "nexus", "k": 2, "normalize": True, "domain_dim": DOMAIN_DIM
    }  # fmt: skip
    defaults = NexusRouterConfig.from_dict({"kind": "nexus", "domain_dim": 4}, "router")
    assert (defaults.k, defaults.normalize) == (1, False)


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"k": 4}, r"layers\[1\]\.ffn\.router\.k = 4 exceeds num_experts = 3"),
        ({"domain_dim": None}, r"layers\[1\]\.ffn\.router: missing required key 'domain_dim'"),
        ({"domain_dim": -8}, r"layers\[1\]\.ffn\.router\.domain_dim must be a positive integer"),
        ({"k": 0}, r"layers\[1\]\.ffn\.router\.k must be a positive integer"),
        ({"normalize": "no"}, r"layers\[1\]\.ffn\.router\.normalize must be true or false"),
        ({"temperature": 1.0}, r"layers\[1\]\.ffn\.router: unknown key\(s\) \['temperature'\]"),
    ],
)
def test_invalid_nexus_router_fails_naming_the_field(router: dict[str, Any], message: str) -> None:
    d = nexus_config()
    d["layers"][1]["ffn"]["router"].update(router)
    if router.get("domain_dim", 0) is None:
        del d["layers"][1]["ffn"]["router"]["domain_dim"]
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d)


def test_nexus_routes_only_ffn_experts() -> None:
    d = nexus_config()
    nexus = copy.deepcopy(d["layers"][1]["ffn"]["router"])
    d["layers"][0]["attention"] = {"kind": "moa", "num_experts": 2, "router": nexus}
    with pytest.raises(ValueError, match=r"layers\[0\]\.attention\.router: router kind 'nexus'"):
        ModelConfig.from_dict(d)


# --------------------------------------------------------------------------- compile


needs_shapes_spec = pytest.mark.skipif(
    not supports_shapes_spec(), reason="shape-stable compile needs torch.compile(shapes_spec=)"
)
SHAPES = [(2, 7), (3, 19)]


@pytest.fixture
def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def outputs_match(compiled: Any, model: MoECausalLM, x: Tensor) -> Tensor:
    """Logits of the compiled model on x, checked against eager and for recompiles."""
    out, reference = compiled(x), model(x)
    assert counters["stats"]["unique_graphs"] == 1, f"recompiled at {tuple(x.shape)}"
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, reference.aux_loss, atol=1e-6, rtol=1e-5)
    return out.logits


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_eval_model_reads_the_cache_without_recompiling(fresh_dynamo: None) -> None:
    model = nexus_model().eval()
    calls = count_projections(model)
    compiled = compile_model(model)
    x = ids(*SHAPES[-1])
    with torch.no_grad():
        for batch, seq in SHAPES:
            outputs_match(compiled, model, ids(batch, seq))
        before = compiled(x).logits
        assert not calls
        state = model.state_dict()
        state[PREFIX + "domain_embeddings"] = torch.randn(EXPERTS, DOMAIN_DIM)
        model.load_state_dict(state)
        assert len(calls) == 1  # the refresh
        after = outputs_match(compiled, model, x)
    assert not torch.allclose(before, after)
    assert len(calls) == 1


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_nexus_training_matches_eager_without_recompiling(fresh_dynamo: None) -> None:
    assert_compiled_training_matches_eager(nexus_model(), SHAPES, ids)
