"""Mixture of attention (BAM): function preservation, fused vs reference, KV-cache decoding,
parallel blocks and compilation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import assert_compiled_inference_matches_eager, assert_compiled_training_matches_eager
from torch._dynamo.utils import counters

from moecompose.model import MoECausalLM, compile_model, parts
from moecompose.model.attention_mix import MixtureOfAttention
from moecompose.model.compile import supports_shapes_spec
from moecompose.model.config import MoAAttentionConfig, SoftRouterConfig, TopKRouterConfig
from moecompose.model.parts import Attention, RotaryEmbedding, padding_mask

SOFT = {"kind": "soft"}
TOP1 = {"kind": "topk", "k": 1, "normalize": True}
TOP2 = {"kind": "topk", "k": 2, "normalize": False}
SHARES = {"expert-kv": [], "shared-kv": ["k", "v"]}


def moa(num_experts: int = 3, share: list[str] | None = None, router: dict | None = None) -> dict:
    return {
        "kind": "moa",
        "num_experts": num_experts,
        "share": share or [],
        "router": router or SOFT,
    }


MOE_FFN = {
    "kind": "moe",
    "num_experts": 4,
    "intermediate_size": 32,
    "router": {"kind": "topk", "k": 2, "normalize": True},
    "shared_expert": None,
    "aux_loss": {"load_balance": 0.01, "z_loss": 0.001},
}


def config(layers: list[dict], **overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 256,
        "layers": copy.deepcopy(layers),
    }
    d.update(overrides)
    return d


def ids(batch: int = 2, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Norms and biases away from their neutral initial values, so they matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif "bias" in name:
                p.copy_(torch.rand(p.shape, generator=generator) - 0.5)


# --------------------------------------------------------------------------- identical experts


transformers = pytest.importorskip("transformers")


def hf_model(family: str) -> Any:
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    hf_config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = model_cls(hf_config).eval()
    randomize(model)
    return model


def upcycled_attention(hf: Any, num_experts: int, shared_kv: bool) -> dict[str, torch.Tensor]:
    """HF weights with every layer's attention copied into `num_experts` identical experts."""
    state = dict(hf.state_dict())
    generator = torch.Generator().manual_seed(1)
    stack = {f"{p}_proj": p for p in ("qo" if shared_kv else "qkvo")}
    for i in range(hf.config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        for proj, short in stack.items():
            w = state.pop(f"{prefix}{proj}.weight")
            state[f"{prefix}experts.{proj}"] = w.expand(num_experts, *w.shape).clone()
            bias = state.pop(f"{prefix}{proj}.bias", None)
            if bias is not None:
                state[f"{prefix}experts.{short}_bias"] = bias.expand(num_experts, -1).clone()
        state[f"{prefix}router.weight"] = torch.randn(num_experts, 32, generator=generator)
    return state


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("share", SHARES.values(), ids=SHARES.keys())
@pytest.mark.parametrize("router", [SOFT, TOP1], ids=["soft", "top1"])
def test_identical_attention_experts_reproduce_dense_logits(
    family: str, share: list[str], router: dict
) -> None:
    hf = hf_model(family)
    layers = [{"ffn": {"kind": "dense"}, "attention": moa(3, share, router)}] * 2
    model = MoECausalLM.from_config(
        config(layers, attention_bias=family == "qwen2", rms_norm_eps=1e-6)
    )
    model.load_weights(upcycled_attention(hf, 3, shared_kv=bool(share)))
    x = ids(2, 13)
    with torch.no_grad():
        diff = (model(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_attention_tensor_names_follow_the_artifact_format() -> None:
    layers = [
        {"ffn": {"kind": "dense"}, "attention": moa(3, [])},
        {"ffn": {"kind": "dense"}, "attention": moa(3, ["k", "v"])},
    ]
    model = MoECausalLM.from_config(config(layers, attention_bias=True))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if "self_attn" in n}
    assert shapes == {
        "model.layers.0.self_attn.router.weight": (3, 32),
        "model.layers.0.self_attn.experts.q_proj": (3, 32, 32),
        "model.layers.0.self_attn.experts.k_proj": (3, 16, 32),
        "model.layers.0.self_attn.experts.v_proj": (3, 16, 32),
        "model.layers.0.self_attn.experts.o_proj": (3, 32, 32),
        "model.layers.0.self_attn.experts.q_bias": (3, 32),
        "model.layers.0.self_attn.experts.k_bias": (3, 16),
        "model.layers.0.self_attn.experts.v_bias": (3, 16),
        "model.layers.1.self_attn.router.weight": (3, 32),
        "model.layers.1.self_attn.experts.q_proj": (3, 32, 32),
        "model.layers.1.self_attn.experts.o_proj": (3, 32, 32),
        "model.layers.1.self_attn.experts.q_bias": (3, 32),
        "model.layers.1.self_attn.k_proj.weight": (16, 32),
        "model.layers.1.self_attn.k_proj.bias": (16,),
        "model.layers.1.self_attn.v_proj.weight": (16, 32),
        "model.layers.1.self_attn.v_proj.bias": (16,),
    }


# --------------------------------------------------------------------------- fused vs loop


def attention_inputs(
    batch: int, seq: int, positions: bool, padded: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    rope = RotaryEmbedding(8, 10000.0)
    if positions:
        pos = torch.arange(seq).expand(batch, seq) + torch.arange(batch)[:, None]
        cos, sin = rope(pos[:, None], torch.float32)  # [B, 1, S, dh]
    else:
        cos, sin = rope(torch.arange(seq), torch.float32)  # [S, dh]
    mask = None
    if padded:
        attention_mask = torch.ones(batch, seq, dtype=torch.long)
        attention_mask[0, :3] = 0
        mask = padding_mask(attention_mask)
    x = torch.randn(batch, seq, 32, generator=torch.Generator().manual_seed(3))
    return x, cos, sin, mask


@pytest.mark.parametrize("share", SHARES.values(), ids=SHARES.keys())
@pytest.mark.parametrize("router", [SOFT, TOP2], ids=["soft", "top2"])
@pytest.mark.parametrize(("positions", "padded"), [(False, False), (True, True)])
def test_fused_mixture_matches_the_reference_loop(
    share: list[str], router: dict, positions: bool, padded: bool
) -> None:
    spec = MoAAttentionConfig.from_dict(moa(3, share, router), "attention")
    torch.manual_seed(0)
    fused = MixtureOfAttention(32, 4, 2, 8, spec, bias=True, impl="fused")
    loop = MixtureOfAttention(32, 4, 2, 8, spec, bias=True, impl="loop")
    loop.load_state_dict(fused.state_dict())
    x, cos, sin, mask = attention_inputs(2, 9, positions, padded)
    grad = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    results = []
    for layer in (fused, loop):
        xi = x.clone().requires_grad_()
        y = layer(xi, cos, sin, mask)
        y.backward(grad)
        results.append((y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y_f, gx_f, g_f), (y_l, gx_l, g_l) = results
    torch.testing.assert_close(y_f, y_l, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx_f, gx_l, atol=1e-5, rtol=0)
    assert g_f.keys() == g_l.keys() and "router.weight" in g_f
    for name in g_f:
        assert g_f[name] is not None and g_l[name] is not None, name
        torch.testing.assert_close(g_f[name], g_l[name], atol=1e-5, rtol=0, msg=name)


def test_single_expert_mixture_is_ordinary_attention() -> None:
    for share in ([], ["k", "v"]):
        spec = MoAAttentionConfig(num_experts=1, router=SoftRouterConfig(), share=tuple(share))
        mix = MixtureOfAttention(32, 4, 2, 8, spec, bias=True)
        dense = Attention(32, 4, 2, 8, bias=True)
        with torch.no_grad():
            for p in ("q", "o") if share else ("q", "k", "v", "o"):
                getattr(dense, f"{p}_proj").weight.copy_(getattr(mix.experts, f"{p}_proj")[0])
            for p in ("q",) if share else ("q", "k", "v"):
                getattr(dense, f"{p}_proj").bias.copy_(getattr(mix.experts, f"{p}_bias")[0])
            if share:
                dense.k_proj.load_state_dict(mix.k_proj.state_dict())
                dense.v_proj.load_state_dict(mix.v_proj.state_dict())
            x, cos, sin, mask = attention_inputs(2, 7, positions=False, padded=False)
            torch.testing.assert_close(mix(x, cos, sin, mask), dense(x, cos, sin, mask))


def test_topk_router_zeroes_all_but_k_experts() -> None:
    spec = MoAAttentionConfig(num_experts=4, router=TopKRouterConfig(k=2, normalize=True))
    weights = MixtureOfAttention(32, 4, 2, 8, spec).mixture_weights(torch.randn(5, 32))
    assert weights.dtype == torch.float32
    assert ((weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


# --------------------------------------------------------------------------- KV cache


VARIANTS = {
    "dense": ({"kind": "dense"}, 2),
    "expert-kv": (moa(3, []), 3 * 2),
    "shared-kv": (moa(3, ["k", "v"]), 2),
}


def variant_model(variant: str, **overrides: Any) -> MoECausalLM:
    attention, _ = VARIANTS[variant]
    layers = [
        {"ffn": {"kind": "dense"}, "attention": attention},
        {"ffn": MOE_FFN, "attention": attention},
    ]
    torch.manual_seed(0)
    model = MoECausalLM.from_config(config(layers, attention_bias=True, **overrides))
    randomize(model)
    return model.eval()


CACHES = {"dynamic": None, "static": 16}  # max_length given to new_cache


WINDOWS = {"full": None, "window 3": 3}  # sliding_window; 3 < the 12 tokens decoded


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", ["sequential", "parallel"])
@pytest.mark.parametrize("max_length", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_decoding_with_the_cache_matches_the_full_forward(
    variant: str, block: str, max_length: int | None, window: int | None
) -> None:
    model = variant_model(variant, block=block, sliding_window=window)
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(max_length=max_length, batch_size=2)
        steps = [model(x[:, :5], cache=cache).logits]  # prefill
        steps.append(model(x[:, 5:7], cache=cache).logits)  # two tokens at once
        for t in range(7, 12):
            out = model(x[:, t : t + 1], cache=cache)
            assert out.cache is cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    _, heads = VARIANTS[variant]
    held = max_length or 12  # a static cache is allocated for max_length tokens
    assert cache.length == 12
    for layer in cache.layers:
        assert layer.key is not None and layer.value is not None
        assert tuple(layer.key.shape) == tuple(layer.value.shape) == (2, heads, held, 8)
    assert cache.nbytes() == 2 * held * sum(model.kv_cache_bytes_per_token())


@pytest.mark.parametrize("variant", ["expert-kv", "shared-kv"])
@pytest.mark.parametrize("max_length", CACHES.values(), ids=CACHES.keys())
def test_reference_loop_decodes_like_the_fused_mixture(
    variant: str, max_length: int | None
) -> None:
    model = variant_model(variant)
    x = ids(1, 6)
    logits = []
    with torch.no_grad():
        for impl in ("fused", "loop"):
            model.set_attention_impl(impl)
            cache = model.new_cache(max_length=max_length)
            steps = [model(x[:, :3], cache=cache).logits]
            steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(3, 6)]
            logits.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="impl"):
        model.set_attention_impl("fast")  # type: ignore[arg-type]


SOFTCAPPED = {"attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 16}  # Gemma 2's scores
ATTENTIONS = {  # variant, mixture impl, config overrides
    "dense": ("dense", "fused", {}),
    "expert-kv fused": ("expert-kv", "fused", {}),
    "expert-kv loop": ("expert-kv", "loop", {}),
    "shared-kv loop": ("shared-kv", "loop", {}),
    "soft-capped dense": ("dense", "fused", SOFTCAPPED),
    "soft-capped expert-kv fused": ("expert-kv", "fused", SOFTCAPPED),
    "soft-capped shared-kv loop": ("shared-kv", "loop", SOFTCAPPED),
}
SPANS = [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, 12)]  # prompt, 2 tokens, 1 at a time


def attention_model(name: str, window: int | None = None) -> MoECausalLM:
    variant, impl, overrides = ATTENTIONS[name]
    model = variant_model(variant, sliding_window=window, **overrides).double()
    model.set_attention_impl(impl)
    return model


def decode_spans(model: MoECausalLM, x: torch.Tensor, masked: bool,
                 after_step: Any = None) -> torch.Tensor:
    """Logits of x [B, 12] decoded with a growing cache, `SPANS` at a time; with `masked`,
    every call passes an all-ones attention mask (no padding, but a mask to build)."""
    cache = model.new_cache()
    steps = []
    with torch.no_grad():
        for start, end in SPANS:
            mask = torch.ones(x.shape[0], end, dtype=torch.long) if masked else None
            steps.append(model(x[:, start:end], attention_mask=mask, cache=cache).logits)
            if after_step is not None:
                after_step()
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", ATTENTIONS)
@pytest.mark.parametrize("window", [None, 8], ids=["full", "window 8"])
def test_decoding_without_masks_matches_the_full_forward_and_the_masked_cache(
    name: str, window: int | None
) -> None:
    """Unpadded decoding with a growing cache attends without a mask where none hides a
    key (prompt: causal; one new token: every key); an all-ones attention mask makes every
    step build one. Both equal the full forward (fp64; the routers' logits are fp32)."""
    model = attention_model(name, window)
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x).logits
    maskless, masked = (decode_spans(model, x, m) for m in (False, True))
    torch.testing.assert_close(maskless, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(masked, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(maskless, masked, atol=1e-12, rtol=0)


@pytest.fixture
def attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """(a mask tensor was given, is_causal) of every attention call, SDPA or soft-capped."""
    calls: list[tuple[bool, bool]] = []
    sdpa, softcapped = F.scaled_dot_product_attention, parts.softcapped_attention

    def recording_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    **kwargs)

    def recording_softcapped(q, k, v, mask, is_causal, scale, cap):
        calls.append((mask is not None, is_causal))
        return softcapped(q, k, v, mask, is_causal, scale, cap)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(parts, "softcapped_attention", recording_softcapped)
    return calls


CAUSAL, EVERY_KEY, MASKED = (False, True), (False, False), (True, False)


@pytest.mark.parametrize("name", ["dense", "expert-kv fused", "expert-kv loop",
                                  "soft-capped shared-kv loop"])
@pytest.mark.parametrize("window", [None, 8], ids=["full", "window 8"])
@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "attention mask"])
def test_a_growing_cache_builds_a_mask_only_where_it_hides_a_key(
    name: str, window: int | None, masked: bool, attention_calls: list[tuple[bool, bool]]
) -> None:
    """Which attention each step runs: without an attention mask, the prompt is causal,
    one new token sees every key while the window covers them, and only several tokens
    after cached ones (SDPA's causal diagonal starts at the first key) or a window that
    hides keys build a mask; with one, every step does."""
    seen = []

    def after_step() -> None:
        seen.append(set(attention_calls))
        attention_calls.clear()

    decode_spans(attention_model(name, window), ids(2, 12), masked, after_step)
    if masked:
        expected = [{MASKED}] * len(SPANS)
    else:
        covered = [window is None or start < window for start, _ in SPANS]
        expected = [{CAUSAL}, {MASKED}] + [{EVERY_KEY if c else MASKED} for c in covered[2:]]
    assert seen == expected


PADDED_CACHES = {"dynamic": (None, True), "static": (12, True), "static, new columns": (12, False)}


@pytest.mark.parametrize(
    ("max_length", "whole_mask"), PADDED_CACHES.values(), ids=PADDED_CACHES.keys()
)
@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_decoding_left_padded_rows_with_the_cache(
    max_length: int | None, whole_mask: bool, window: int | None
) -> None:
    """`attention_mask` covers the cached tokens too, or (static cache) just the new ones."""
    model = variant_model("expert-kv", sliding_window=window)
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(x, attention_mask=mask, position_ids=positions).logits
        cache = model.new_cache(max_length=max_length, batch_size=2)
        steps = [model(x[:, :4], mask[:, :4], positions[:, :4], cache=cache).logits]
        for t in range(4, 9):
            step_mask = mask[:, : t + 1] if whole_mask else mask[:, t : t + 1]
            step = model(x[:, t : t + 1], step_mask, positions[:, t : t + 1], cache=cache)
            steps.append(step.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], atol=1e-5, rtol=0)


def test_static_cache_overflow_is_a_value_error() -> None:
    model = variant_model("shared-kv")
    cache = model.new_cache(max_length=6, batch_size=2)
    with torch.no_grad():
        model(ids(2, 5), cache=cache)
        with pytest.raises(
            ValueError, match=r"2 new token\(s\) after 5 cached exceed max_length=6"
        ):
            model(ids(2, 2), cache=cache)
        model(ids(2, 1), cache=cache)  # the last free position
    assert cache.length == 6


def test_static_cache_buffers_are_static_addresses() -> None:
    """What `mode="reduce-overhead"` needs to replay a CUDA graph on the cache itself:
    every buffer written in place across calls is marked a static address."""
    cache = variant_model("expert-kv").new_cache(max_length=6, batch_size=2)
    tensors = [cache.position, cache.keep, *cache.buffers()]
    assert len(tensors) == 2 + 2 * len(cache.layers)
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in tensors)


def test_kv_cache_bytes_per_token_per_variant() -> None:
    per_layer = {v: variant_model(v).kv_cache_bytes_per_token() for v in VARIANTS}
    assert per_layer["dense"] == [2 * 2 * 8 * 4] * 2  # k and v, kv heads, dh, fp32
    assert per_layer["expert-kv"] == [3 * 2 * 2 * 8 * 4] * 2
    assert per_layer["shared-kv"] == per_layer["dense"]


def test_generate_is_greedy_decoding() -> None:
    model = variant_model("shared-kv")
    prompt = ids(2, 4)
    out = model.generate(prompt, max_new_tokens=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], prompt)
    expected = prompt
    with torch.no_grad():
        for _ in range(5):
            step = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat((expected, step), dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, max_length=32), expected)
    with pytest.raises(ValueError, match="max_length=8 is less than 4 \\+ 5"):
        model.generate(prompt, max_new_tokens=5, max_length=8)


# --------------------------------------------------------------------------- parallel block


def test_parallel_block_feeds_the_mixture_and_the_ffn_the_same_residual() -> None:
    model = variant_model("expert-kv", block="parallel")
    layer = model.model.layers[1]
    x = torch.randn(2, 5, 32)
    cos, sin = model.model.rotary_emb(torch.arange(5), x.dtype)
    with torch.no_grad():
        ffn, aux = layer.mlp(layer.post_attention_layernorm(x))
        expected = x + layer.self_attn(layer.input_layernorm(x), cos, sin, None) + ffn
        y, layer_aux = layer(x, cos, sin, None)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer_aux, aux)


# --------------------------------------------------------------------------- compile


needs_shapes_spec = pytest.mark.skipif(
    not supports_shapes_spec(), reason="shape-stable compile needs torch.compile(shapes_spec=)"
)
SHAPES = [(b, s) for b in (1, 2, 3) for s in (1, 7, 64, 200)]


def mixed_model(block: str = "sequential") -> MoECausalLM:
    """Expert-KV and shared-KV attention mixtures, dense attention, dense and MoE FFNs."""
    layers = [
        {"ffn": MOE_FFN, "attention": moa(3, [], SOFT)},
        {"ffn": {"kind": "dense"}, "attention": moa(2, ["k", "v"], TOP1)},
        {"ffn": MOE_FFN},
    ]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    return MoECausalLM.from_config(config(layers, attention_bias=True, block=block))


@pytest.mark.slow
@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_mixture_of_attention_forward_has_no_graph_breaks(block: str) -> None:
    explanation = torch._dynamo.explain(mixed_model(block))(ids(2, 7))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.slow
@needs_shapes_spec
@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_compiled_mixture_of_attention_does_not_recompile(block: str) -> None:
    assert_compiled_inference_matches_eager(
        mixed_model(block), SHAPES, lambda b, s: ids(b, s, seed=b * s)
    )


@pytest.mark.slow
@needs_shapes_spec
@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_compiled_mixture_of_attention_training_matches_eager(block: str) -> None:
    """Training through `compile_model`: eager's gradients, one graph for every shape."""
    model = mixed_model(block)
    assert "model.layers.1.self_attn.k_proj.bias" in dict(model.named_parameters())  # shared-KV
    assert_compiled_training_matches_eager(
        model, [(2, 7), (1, 1), (3, 64)], lambda b, s: ids(b, s, seed=b + s)
    )


@pytest.mark.slow
@needs_shapes_spec
def test_compiled_decoding_with_a_static_cache_does_not_recompile() -> None:
    """Prompt and decode steps of every generation run the graph compiled for the first
    prompt: the static cache's shapes and its write position (a tensor) never change."""
    model = mixed_model().eval()
    compiled = compile_model(model)
    for prompt_len, new_tokens in [(5, 6), (1, 3), (9, 7)]:
        prompt = ids(2, prompt_len, seed=prompt_len)
        out = model.generate(prompt, new_tokens, max_length=16, forward=compiled)
        assert counters["stats"]["unique_graphs"] == 1, f"recompiled for a prompt of {prompt_len}"
        assert torch.equal(out, model.generate(prompt, new_tokens))
    with torch.no_grad():  # padded rows, and the mask of the new tokens only
        x = ids(2, 8)
        mask = torch.ones_like(x)
        mask[0, :2] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(x, attention_mask=mask, position_ids=positions).logits
        cache = model.new_cache(max_length=16, batch_size=2)
        steps = [compiled(x[:, :5], mask[:, :5], positions[:, :5], cache=cache).logits]
        for t in range(5, 8):
            span = slice(t, t + 1)
            steps.append(
                compiled(x[:, span], mask[:, span], positions[:, span], cache=cache).logits
            )
        keep = mask.bool()
        torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], atol=1e-4, rtol=0)
        assert counters["stats"]["unique_graphs"] == 2  # one more, for the mask
        compiled(ids(2, 8), cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow"):
            compiled(ids(2, 1), cache=cache)
