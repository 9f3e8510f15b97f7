"""Mixed precision: every bundled artifact trains under `torch.autocast` (bf16) with fp32
master weights, its custom expert ops in the autocast dtype and its routers in fp32."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

import moecompose
from moecompose.model import MoECausalLM, compile_model
from moecompose.model.adapters import grouped_linear
from moecompose.model.grouped_swiglu import grouped_swiglu
from moecompose.model.routing import (
    NexusRouter,
    Routing,
    SoftRouter,
    TokenMixingRouter,
    TopKRouter,
)
from moecompose.model.token_mixing import batch_major

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "specs").glob("*.yaml"))
ROUTERS = (TopKRouter, SoftRouter, NexusRouter, TokenMixingRouter)
TOKEN_CHOICE = (TopKRouter, NexusRouter)
AMP = {"device_type": "cpu", "dtype": torch.bfloat16}

# Gradient tolerance: relative error ||g_amp - g_fp32|| / ||g_fp32|| per tensor. bf16 keeps
# 8 significant bits, a relative rounding error of up to 2^-9 ~ 0.2% (u) per value; every
# bf16 GEMM rounds its inputs and its output, and a gradient here goes through a few dozen
# such roundings (4 layers forward and back), which add up mostly incoherently: measured,
# 0.1-2% for these models. 5% (~25 u) leaves margin for other CPUs' bf16 kernels and is
# still far below what a gradient in the wrong dtype or of a wrong formula gives. Routing is
# pinned to the fp32 run's expert choices (`routing_pinned`): a top-k choice is discrete,
# and a token whose two best experts score within bf16 noise of each other would otherwise
# switch experts and change those experts' gradients by far more than rounding does.
GRAD_RTOL = 5e-2


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECOMPOSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module", params=BUNDLED, ids=lambda p: p.stem)
def artifact(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each bundled spec (written against specs/dense/), built once."""
    return moecompose.build(request.param, tmp_path_factory.mktemp("amp") / request.param.stem).path


def tokens(batch: int = 4, seq: int = 32) -> Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross entropy (on fp32 logits) plus the aux losses, as in training."""
    out = model(ids)
    logits = out.logits[:, :-1].float().flatten(0, 1)
    return F.cross_entropy(logits, ids[:, 1:].flatten()) + out.aux_loss


def step(
    model: nn.Module, ids: Tensor, amp: bool, run: nn.Module | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward of `run` (`model` or a compiled form of it; under bf16 autocast when
    `amp`) and backward: (loss, gradients of `model`'s parameters)."""
    for p in model.parameters():
        p.grad = None
    with torch.autocast(**AMP, enabled=amp):
        loss = lm_loss(model if run is None else run, ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@contextmanager
def routing_pinned(model: nn.Module) -> Iterator[None]:
    """Inside, every token-choice router picks the experts it chose on its first call, with
    the probabilities of the current call's logits: two runs route alike and differ only
    in rounding."""
    chosen: dict[nn.Module, Tensor] = {}

    def pin(router: nn.Module, args: object, out: Routing) -> Routing:
        indices = chosen.setdefault(router, out.indices)
        weights = out.logits.softmax(dim=-1).gather(-1, indices)
        if router.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, indices, out.logits)

    handles = [m.register_forward_hook(pin) for m in model.modules() if isinstance(m, TOKEN_CHOICE)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    diff, scale = (a - b).norm().item(), b.norm().item()
    return diff / scale if scale else diff


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_training_step_under_bf16_autocast_has_fp32_gradients_close_to_fp32_training(
    artifact: Path, kernels: str
) -> None:
    model = moecompose.load(artifact).train()
    if kernels == "reference":
        model.set_dispatch("loop")
        model.set_attention_impl("loop")
    ids = tokens()
    with routing_pinned(model):
        loss32, grads32 = step(model, ids, amp=False)
        loss, grads = step(model, ids, amp=True)
    with torch.autocast(**AMP), torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16  # the run was mixed precision
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss32, rtol=1e-3, atol=0)  # measured: 3e-5 or less
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert grads.keys() == grads32.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert relative_error(grad, grads32[name]) <= GRAD_RTOL, name


def test_routers_compute_in_fp32_under_autocast(artifact: Path) -> None:
    """Every router's output under autocast is fp32 and bit-identical to the same router
    called on the same input without autocast: computed in fp32, not cast afterwards."""
    model = moecompose.load(artifact).train()
    calls: list[tuple[nn.Module, tuple, object]] = []
    handles = [
        m.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
        for m in model.modules()
        if isinstance(m, ROUTERS)
    ]
    with torch.autocast(**AMP):
        out = model(tokens())
    for handle in handles:
        handle.remove()
    assert out.aux_loss.dtype == torch.float32
    assert calls
    for router, args, routed in calls:
        expected = router(*args)
        if isinstance(routed, Routing):
            assert routed.logits.dtype == routed.weights.dtype == torch.float32
            assert all(torch.equal(a, b) for a, b in zip(routed, expected, strict=True))
        else:
            assert routed.dtype == torch.float32
            assert torch.equal(routed, expected)


# --------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("artifact", [p for p in BUNDLED if p.stem != "mixture_of_tokens"],
                         indirect=True, ids=lambda p: p.stem)  # mixing needs a batch to decode
def test_decoding_with_a_static_cache_under_autocast(artifact: Path) -> None:
    """The cache keeps the model's dtype; autocast's bf16 keys and values are stored in it."""
    model = moecompose.load(artifact)
    prompt = tokens(batch=1, seq=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, max_new_tokens=4)
    assert out.shape == (1, 10) and torch.equal(out[:, :6], prompt)


def expert_inputs(T: int = 12, k: int = 2, E: int = 3, d: int = 16, f: int = 24) -> dict:
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, E, (T, k), generator=g)
    return {
        "x": torch.randn(T, d, generator=g, requires_grad=True),
        "order": indices.reshape(-1).argsort(stable=True),
        "counts": torch.bincount(indices.reshape(-1), minlength=E),
        "gate": torch.randn(E, f, d, generator=g, requires_grad=True),
        "up": torch.randn(E, f, d, generator=g, requires_grad=True),
        "down": torch.randn(E, d, f, generator=g, requires_grad=True),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [True, False])
def test_grouped_swiglu_runs_in_the_autocast_dtype(dtype: torch.dtype, grad: bool) -> None:
    """Under autocast the op equals itself on inputs cast to the autocast dtype (forward and
    input gradients), and fp32 inputs get fp32 gradients."""
    inputs = expert_inputs()
    cast = {
        n: t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t
        for n, t in inputs.items()
    }
    with torch.set_grad_enabled(grad):
        with torch.autocast("cpu", dtype=dtype):
            y = grouped_swiglu(**inputs)
        expected = grouped_swiglu(**cast)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    if not grad:
        return
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    for name in ("x", "gate", "up", "down"):
        assert inputs[name].grad.dtype == torch.float32
        torch.testing.assert_close(inputs[name].grad, cast[name].grad.float(), rtol=0, atol=0)


def test_grouped_swiglu_backward_inside_autocast_keeps_the_forwards_dtype() -> None:
    """A forward outside autocast, its backward inside a region: fp32 gradients, exact."""
    inputs = expert_inputs()
    dy = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    grouped_swiglu(**inputs).backward(dy)
    expected = {n: t.grad for n, t in inputs.items() if t.is_floating_point()}
    again = {n: t.detach().requires_grad_() if t.is_floating_point() else t for n, t in inputs.items()}
    y = grouped_swiglu(**again)
    with torch.autocast(**AMP):
        y.backward(dy)
    for name, grad in expected.items():
        torch.testing.assert_close(again[name].grad, grad, rtol=0, atol=0)


def test_grouped_linear_runs_in_the_autocast_dtype_and_backward_may_run_under_autocast() -> None:
    inputs = expert_inputs()
    x = inputs["x"].detach().repeat(2, 1).requires_grad_()  # [N = T*k, d], sorted rows
    weight, counts = inputs["gate"], inputs["counts"]
    with torch.autocast(**AMP):
        y = grouped_linear(x, counts, weight)
        y.float().square().sum().backward()  # backward inside the region: still bf16
    xb, wb = (t.detach().bfloat16().requires_grad_() for t in (x, weight))
    expected = grouped_linear(xb, counts, wb)
    expected.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xb.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, wb.grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_major_keeps_its_input_dtype_under_autocast(dtype: torch.dtype) -> None:
    y = torch.randn(5, 4, 8, dtype=dtype, requires_grad=True)  # [S, P, d]
    with torch.autocast(**AMP):
        out = batch_major(y, 3)
    assert out.dtype == dtype
    torch.testing.assert_close(out, y[:, :3].transpose(0, 1), rtol=0, atol=0)
    out.sum().backward()
    assert y.grad.dtype == dtype


# --------------------------------------------------------------------------- compiled


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sparse_upcycling", "pesc", "mixture_of_tokens"])
def test_compiled_training_step_under_autocast_matches_eager(name: str, tmp_path: Path) -> None:
    """`compile_model` under bf16 autocast (each custom op's autocast rule traced: grouped
    SwiGLU, grouped linear, batch-major): one graph, no breaks (`fullgraph`), eager's loss
    and fp32 gradients. Inductor fuses elementwise chains and so would skip some of
    eager's intermediate bf16 roundings, enough to flip a near-tied top-k choice; with
    `emulate_precision_casts` it rounds where eager does (measured: the same loss, every
    gradient within 0.7%), so the bf16 tolerances of the fp32 comparison apply."""
    torch._dynamo.reset()
    counters.clear()
    spec = ROOT / "specs" / f"{name}.yaml"
    model = moecompose.load(moecompose.build(spec, tmp_path / name).path).train()
    assert isinstance(model, MoECausalLM)
    ids = tokens()
    loss, grads = step(model, ids, amp=True)
    with torch._inductor.config.patch(emulate_precision_casts=True):
        fast_loss, fast = step(model, ids, amp=True, run=compile_model(model))
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(fast_loss, loss, rtol=1e-3, atol=0)
    assert fast.keys() == grads.keys()
    for n, grad in grads.items():
        assert fast[n].dtype == torch.float32, n
        assert relative_error(fast[n], grad) <= GRAD_RTOL, n
