"""Mixture-of-attention layer speed: fused against the reference loop, shared-KV against expert-KV.

Four layers with the same weights where they share them: expert-KV and shared-KV
mixtures, each as `impl="fused"` (one GEMM per projection over the stacked experts, one
attention call over experts x heads) and `impl="loop"` (one ordinary attention per
expert), plus the dense attention the experts would come from. Forward (no grad) and
forward+backward, eager (and the fused mixtures under `torch.compile(fullgraph=True)`),
medians of interleaved repeats after warm-up, one process.
Also times one decoding step over a static KV cache holding the prompt (fused against
the loop), prints the KV cache each variant holds per token and layer, and profiles eager
fwd+bwd steps of each path: the time inside the GEMM and attention kernels both paths
share (same FLOPs) bounds how far below the loop any batching of the same arithmetic can
go, `fused / loop >= fused kernel time / loop total time`.

    python benchmarks/moa.py            # E=3, d=512, 8 heads, B=1, S=2048, fp32
    python benchmarks/moa.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from timing import Call, forward_backward_step, median_seconds, print_report, time_calls
from torch import nn
from torch.profiler import ProfilerActivity, profile

from moecompose.model.attention_mix import MixtureOfAttention
from moecompose.model.cache import StaticKVCache
from moecompose.model.config import MoAAttentionConfig, SoftRouterConfig
from moecompose.model.parts import Attention, RotaryEmbedding


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
        spec = MoAAttentionConfig(num_experts=E, router=SoftRouterConfig(), share=share)
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

    rows = time_calls(
        {name: (call(m), m.parameters()) for name, m in modules.items()}, x, grad, args.repeats, warmup
    )
    ratios = [
        ("expert-KV fused / loop", "expert-KV fused", "expert-KV loop (reference)"),
        ("shared-KV fused / loop", "shared-KV fused", "shared-KV loop (reference)"),
        ("shared-KV fused / expert-KV fused", "shared-KV fused", "expert-KV fused"),
        ("expert-KV fused / dense attention", "expert-KV fused", "dense attention"),
    ]
    for variant in ("expert-KV", "shared-KV"):
        ratios.append((f"{variant} fused compiled / loop", f"{variant} fused compiled",
                       f"{variant} loop (reference)"))
    print_report(rows, ratios)

    decode_report(modules, x.detach(), cos, sin, args.repeats, warmup)
    kernel_report(modules, call, x, grad)

    print("KV cache per token and layer (k and v):")
    for name in ("dense attention", "expert-KV fused", "shared-KV fused"):
        heads = modules[name].cached_kv_heads
        fp32, bf16 = 2 * heads * dh * 4, 2 * heads * dh * 2
        print(f"  {name.split()[0]:10s} {heads:3d} kv heads  {fp32:6d} B fp32  {bf16:6d} B bf16")


# The arithmetic both paths do in the same kernels: GEMMs and the attention kernels
# (forward and backward), by profiler event name.
KERNELS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "flash_attention")


def kernel_report(modules: dict[str, nn.Module], call: Any, x: torch.Tensor,
                  grad: torch.Tensor) -> None:
    """Three profiled eager fwd+bwd steps per path: self time in the shared kernels, and
    the best fused / loop ratio that saving every other microsecond could reach."""
    steps = 3
    print(f"eager fwd+bwd, profiled (mean of {steps}): time in GEMM and attention kernels")
    for variant in ("expert-KV", "shared-KV"):
        kernel, total = {}, {}
        for impl in ("loop (reference)", "fused"):
            module = modules[f"{variant} {impl}"]
            step = forward_backward_step(call(module), module.parameters(), x, grad)
            step()  # warm
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
            events = prof.key_averages()
            total[impl] = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
            kernel[impl] = sum(
                e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS)
            ) / 1e3 / steps
            print(f"  {variant} {impl:17s} {total[impl]:8.1f} ms  kernels {kernel[impl]:8.1f} ms "
                  f"({kernel[impl] / total[impl]:.0%})")
        bound = kernel["fused"] / total["loop (reference)"]
        print(f"  {variant} fused / loop cannot go below {bound:.2f}x with these kernels")


def decode_report(modules: dict[str, nn.Module], prompt: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, repeats: int, warmup: int) -> None:
    """One decoding step (one new token per sequence) over a static cache holding the
    prompt: the step `generate` repeats, eager, fused against the loop."""
    B, S, _ = prompt.shape
    steps = {}
    for name in ("expert-KV loop (reference)", "expert-KV fused",
                 "shared-KV loop (reference)", "shared-KV fused"):
        module = modules[name]
        cache = StaticKVCache([module.cached_kv_heads], B, S + 1, cos.shape[-1], prompt.dtype,
                              prompt.device)
        with torch.no_grad():
            module(prompt[:, :-1], cos[:-1], sin[:-1], cache.mask(S - 1, None, prompt.device),
                   cache.layers[0])
        cache.advance(S - 1)
        mask = cache.mask(1, None, prompt.device)  # the step writes the same slot each repeat

        def step(module=module, cache=cache, mask=mask) -> None:
            with torch.no_grad():
                module(prompt[:, -1:], cos[-1:], sin[-1:], mask, cache.layers[0])

        steps[name] = step
    times = median_seconds(steps, repeats, warmup)
    print(f"one decoding step over {S - 1} cached tokens, eager:")
    for name, t in times.items():
        print(f"  {name:30s} {t * 1e3:8.2f} ms")
    for variant in ("expert-KV", "shared-KV"):
        ratio = times[f"{variant} fused"] / times[f"{variant} loop (reference)"]
        print(f"  {variant} fused / loop            {ratio:.2f}x")


if __name__ == "__main__":
    main()
