"""Mixture-of-attention layer speed: fused against the reference loop, shared-KV against expert-KV.

Four layers with the same weights where they share them: expert-KV and shared-KV
mixtures, each as `impl="fused"` (one GEMM per projection over the stacked experts, one
attention call over experts x heads) and `impl="loop"` (one ordinary attention per
expert), plus the dense attention the experts would come from. Forward (no grad) and
forward+backward, eager (and the fused mixtures under `torch.compile(fullgraph=True)`),
medians of interleaved repeats after warm-up, one process.
Also prints the KV cache each variant holds per token and layer.

    python benchmarks/moa.py            # E=3, d=512, 8 heads, B=1, S=2048, fp32
    python benchmarks/moa.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moecompose.model.attention_mix import MixtureOfAttention
from moecompose.model.config import MoAAttentionSpec, SoftRouterSpec
from moecompose.model.parts import Attention, RotaryEmbedding

Call = Callable[[Tensor], Tensor]


def forward_step(layer: Call, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def forward_backward_step(
    layer: Call, params: list[nn.Parameter], x: Tensor, grad: Tensor
) -> Callable[[], None]:
    """Forward and backward; gradients start from None as after `optimizer.zero_grad()`."""

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return step


def median_seconds(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median time of each step; repeats are interleaved so that load from other processes
    falls on every candidate alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.heads, args.kv_heads, args.batch, args.seq = 64, 4, 2, 2, 64
        args.repeats = 3
    warmup = 2

    torch.manual_seed(0)
    E, d, h, kv, B, S = args.experts, args.dim, args.heads, args.kv_heads, args.batch, args.seq
    dh = d // h
    rope = RotaryEmbedding(dh, 10000.0)
    cos, sin = rope(torch.arange(S), torch.float32)

    def mixture(share: tuple[str, ...], impl: str) -> MixtureOfAttention:
        spec = MoAAttentionSpec(num_experts=E, router=SoftRouterSpec(), share=share)
        return MixtureOfAttention(d, h, kv, dh, spec, impl=impl)  # type: ignore[arg-type]

    modules: dict[str, nn.Module] = {"dense attention": Attention(d, h, kv, dh)}
    for variant, share in (("expert-KV", ()), ("shared-KV", ("k", "v"))):
        fused = mixture(share, "fused")
        loop = mixture(share, "loop")
        loop.load_state_dict(fused.state_dict())
        modules[f"{variant} loop (reference)"] = loop
        modules[f"{variant} fused"] = fused

    if not args.no_compile:
        for variant in ("expert-KV", "shared-KV"):
            fused = modules[f"{variant} fused"]
            modules[f"{variant} fused compiled"] = torch.compile(fused, fullgraph=True)

    x = torch.randn(B, S, d, requires_grad=True)
    grad = torch.randn(B, S, d)
    print(
        f"mixture of attention E={E}, d={d}, heads={h}, kv heads={kv}, dh={dh}; "
        f"B={B}, S={S} (T={B * S}), fp32, soft routing, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    def call(module: nn.Module) -> Call:
        return lambda inp: module(inp, cos, sin, None)

    fwd = median_seconds(
        {name: forward_step(call(m), x) for name, m in modules.items()}, args.repeats, warmup
    )
    fwd_bwd = median_seconds(
        {
            name: forward_backward_step(call(m), list(m.parameters()), x, grad)
            for name, m in modules.items()
        },
        args.repeats,
        warmup,
    )
    print(f"{'':28s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
    for name in modules:
        print(f"{name:28s} {fwd[name] * 1e3:9.1f} {fwd_bwd[name] * 1e3:11.1f}")

    def ratio(label: str, a: str, b: str) -> None:
        print(f"{label:36s} fwd {fwd[a] / fwd[b]:5.2f}x   fwd+bwd {fwd_bwd[a] / fwd_bwd[b]:5.2f}x")

    print("ratios (lower is better):")
    ratio("expert-KV fused / loop", "expert-KV fused", "expert-KV loop (reference)")
    ratio("shared-KV fused / loop", "shared-KV fused", "shared-KV loop (reference)")
    ratio("shared-KV fused / expert-KV fused", "shared-KV fused", "expert-KV fused")
    ratio("expert-KV fused / dense attention", "expert-KV fused", "dense attention")
    if not args.no_compile:
        for variant in ("expert-KV", "shared-KV"):
            ratio(
                f"{variant} fused compiled / loop",
                f"{variant} fused compiled",
                f"{variant} loop (reference)",
            )

    print("KV cache per token and layer (k and v):")
    for name in ("dense attention", "expert-KV fused", "shared-KV fused"):
        heads = modules[name].cached_kv_heads
        fp32, bf16 = 2 * heads * dh * 4, 2 * heads * dh * 2
        print(f"  {name.split()[0]:10s} {heads:3d} kv heads  {fp32:6d} B fp32  {bf16:6d} B bf16")


if __name__ == "__main__":
    main()
