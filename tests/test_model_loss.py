"""The fused output projection and cross-entropy (`model/loss.py`): the loss and gradients
of `F.cross_entropy(h @ W.T)`, in chunks, under autocast and compiled, and the model's
loss-only forward that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moecompose.model import MoECausalLM
from moecompose.model.compile import compile_model, supports_shapes_spec
from moecompose.model.loss import chunk_rows, linear_cross_entropy


def problem(N: int = 37, d: int = 16, V: int = 50, ignored: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(V, d, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:ignored]] = -100
    return h, W, targets


def reference(h, W, targets, softcap=None):
    z = h @ W.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=-100)


def loss_and_grads(fn, h, W, targets, **kw):
    loss = fn(h, W, targets, **kw)
    dh, dW = torch.autograd.grad(loss, (h, W))
    return loss, dh, dW


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_equals_cross_entropy_of_the_logits_with_gradients(chunk: int, softcap: float | None) -> None:
    h, W, targets = problem()
    ours = loss_and_grads(linear_cross_entropy, h, W, targets, softcap=softcap, chunk=chunk)
    ref = loss_and_grads(reference, h, W, targets, softcap=softcap)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_matches_and_the_gradient_scales_with_the_upstream_one() -> None:
    h, W, targets = problem()
    h, W = (t.detach().float().requires_grad_() for t in (h, W))
    loss = linear_cross_entropy(h, W, targets, chunk=8)
    (3 * loss).backward()
    ref_h, ref_W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    (3 * reference(ref_h, ref_W, targets)).backward()
    torch.testing.assert_close(loss, reference(h, W, targets), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad, ref_W.grad, rtol=1e-5, atol=1e-7)


def test_frozen_weight_or_no_grad_computes_only_what_is_asked() -> None:
    h, W, targets = problem()
    W.requires_grad_(False)
    loss = linear_cross_entropy(h, W, targets)
    (dh,) = torch.autograd.grad(loss, (h,))
    torch.testing.assert_close(dh, torch.autograd.grad(reference(h, W, targets), (h,))[0])
    with torch.no_grad():
        assert not linear_cross_entropy(h, W, targets).requires_grad


def test_no_targets_give_nan_like_cross_entropy() -> None:
    h, W, _ = problem()
    none = torch.full((h.shape[0],), -100)
    assert torch.isnan(linear_cross_entropy(h, W, none)) and torch.isnan(reference(h, W, none))


def test_chunks_hold_about_a_million_logits() -> None:
    assert chunk_rows(150_000) == 16 and chunk_rows(8000) == 131 and chunk_rows(10) > 10_000


def test_bfloat16_autocast_runs_the_matmuls_in_bf16_and_returns_fp32_weight_grads() -> None:
    h, W, targets = problem(V=64)
    h, W = (t.detach().float().requires_grad_() for t in (h, W))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, targets, chunk=8)
        ref = F.cross_entropy(F.linear(h, W).float(), targets, ignore_index=-100)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-3)  # the same bf16 logits
    dh, dW = torch.autograd.grad(loss, (h, W))
    ref_dh, ref_dW = torch.autograd.grad(ref, (h, W))
    assert dh.dtype == dW.dtype == torch.float32
    torch.testing.assert_close(dh, ref_dh, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(dW, ref_dW, rtol=2e-2, atol=2e-4)


def tiny(tie: bool, softcap: float | None = None) -> MoECausalLM:
    torch.manual_seed(0)
    return MoECausalLM.from_config({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "tie_word_embeddings": tie, "final_logit_softcapping": softcap,
        "layers": [{"ffn": {"kind": "dense"}},
                   {"ffn": {"kind": "moe", "num_experts": 4, "intermediate_size": 32,
                            "router": {"kind": "topk", "k": 2, "normalize": True},
                            "aux_loss": {"load_balance": 0.05, "z_loss": 0.01}}}],
    })


def grads_of(model: MoECausalLM, run, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = run(**kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("tie", "softcap"), [(False, None), (True, None), (True, 0.5)])
def test_loss_only_forward_equals_the_logits_path(tie: bool, softcap: float | None) -> None:
    """`return_logits=False`: no logits, the same loss (LM + aux, padding masked) and the
    same gradient for every parameter, the tied or separate head included, and with
    Gemma 2's final soft-capping (a small cap, so that it changes the loss)."""
    model = tiny(tie, softcap)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    full, ref = grads_of(model, model, **kw)
    lean, ours = grads_of(model, model, return_logits=False, **kw)
    assert lean.logits is None and full.logits is not None
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not supports_shapes_spec(), reason="needs torch.compile(shapes_spec=)")
def test_compiled_loss_only_forward_is_one_graph_with_eager_gradients() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = tiny(True)
    compiled = compile_model(model)
    for batch, seq in [(2, 7), (3, 20)]:
        ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seq))
        kw = {"input_ids": ids, "labels": ids, "return_logits": False}
        got, ours = grads_of(model, compiled, **kw)
        want, ref = grads_of(model, model, **kw)
        assert counters["stats"]["unique_graphs"] == 1, f"recompiled at {batch}x{seq}"
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
