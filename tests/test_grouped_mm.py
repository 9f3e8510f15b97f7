"""The grouped-GEMM kernel of the expert ops (`torch._grouped_mm`, the CUDA bf16 path),
tested on the CPU's bf16 kernel against the per-expert loop: outputs and every gradient,
both gate activations, an expert without tokens, and the adapters' grouped linear."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moecompose.model.adapters import LINEAR_GROUPED_MM_OPS, grouped_linear
from moecompose.model.grouped_swiglu import (
    GROUPED_MM_OPS,
    grouped_mm_kernel,
    grouped_swiglu,
    uses_grouped_mm,
)

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")
BF16 = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def routed(T: int = 37, E: int = 4, k: int = 2, seed: int = 0):
    """Slots sorted by expert and per-expert counts; the last expert gets no token."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # [T, k]
    order = indices.reshape(-1).argsort(stable=True)
    return order, torch.bincount(indices.reshape(-1), minlength=E)


def param(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.1).to(BF16).requires_grad_()


class CalledOps(TorchDispatchMode):
    """Records the names of the moecompose ops called within it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "moecompose":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


def both_kernels(fn, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[list[torch.Tensor]]:
    """[output, *gradients] with the loop kernel and with the grouped-GEMM kernel, each
    run by its own ops (forward and backward)."""
    results = []
    for enabled in (False, True):
        with grouped_mm_kernel(enabled), CalledOps() as called:
            y = fn()
            results.append([y, *torch.autograd.grad(y, inputs, dy)])
        assert called.names and all(n.endswith("_gmm") == enabled for n in called.names)
    return results


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_grouped_swiglu_kernel_equals_the_loop_with_gradients(activation: str) -> None:
    T, d, f, E, k = 37, 64, 48, 4, 2
    order, counts = routed(T, E, k)
    x = param(T, d, seed=1)
    weights = [param(E, f, d, seed=2), param(E, f, d, seed=3), param(E, d, f, seed=4)]
    dy = torch.randn(T * k, d).to(BF16)
    loop, gmm = both_kernels(
        lambda: grouped_swiglu(x, order, counts, *weights, activation=activation),
        [x, *weights], dy)
    for name, a, b in zip(["y", "dx", "dgate", "dup", "ddown"], gmm, loop, strict=True):
        assert a.dtype == BF16 and a.shape == b.shape
        assert rel(a, b) < 1e-2, name  # bf16: the two kernels round sums differently
    for grad in gmm[2:]:  # the expert without tokens gets zero gradients
        assert grad[E - 1].abs().max() == 0


def test_grouped_linear_kernel_equals_the_loop_with_gradients() -> None:
    N, r, d, E = 40, 16, 64, 4
    _, counts = routed(N // 2, E, 2, seed=5)
    x, weight = param(N, d, seed=6), param(E, r, d, seed=7)
    dy = torch.randn(N, r).to(BF16)
    loop, gmm = both_kernels(lambda: grouped_linear(x, counts, weight), [x, weight], dy)
    for name, a, b in zip(["y", "dx", "dw"], gmm, loop, strict=True):
        assert rel(a, b) < 1e-2, name
    assert gmm[2][E - 1].abs().max() == 0


def test_the_kernel_is_chosen_for_aligned_bf16_only() -> None:
    x, w = torch.zeros(4, 64, dtype=BF16), torch.zeros(2, 16, 64, dtype=BF16)
    assert not uses_grouped_mm(x, w)  # CPU: only when asked for
    with grouped_mm_kernel():
        assert uses_grouped_mm(x, w)
        assert not uses_grouped_mm(x.float(), w.float())  # fp32: the loop
        assert not uses_grouped_mm(x[:, :60], torch.zeros(2, 16, 60, dtype=BF16))  # 120 bytes
        with torch.autocast("cpu", dtype=BF16):  # the ops run in the region's dtype
            assert uses_grouped_mm(x.float(), w.float())
            assert not uses_grouped_mm(x.double(), w.double())  # autocast leaves fp64 alone
        with torch.autocast("cpu", dtype=torch.float16):
            assert not uses_grouped_mm(x, w)
    assert not uses_grouped_mm(x, w)  # the switch is scoped


def test_grouped_mm_ops_pass_opcheck() -> None:
    """The grouped-GEMM kernel's own ops share the loop's schemas, fakes and autograd."""
    order, counts = routed(13, 4, 2)
    x = param(13, 64, seed=1)
    gate, up, down = param(4, 48, 64, seed=2), param(4, 48, 64, seed=3), param(4, 64, 48, seed=4)
    torch.library.opcheck(GROUPED_MM_OPS.forward, (x, order, counts, gate, up, down))
    frozen = (w.detach() for w in (gate, up, down))
    torch.library.opcheck(GROUPED_MM_OPS.inference, (x.detach(), order, counts, *frozen))
    rows = param(26, 64, seed=5)
    torch.library.opcheck(LINEAR_GROUPED_MM_OPS.forward, (rows, counts, param(4, 16, 64, seed=6)))
