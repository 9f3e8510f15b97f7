"""MoE FFN layer speed against its dense twin and the Hugging Face-style expert loop.

The MoE layer (E experts, top-k, expert width f) is compared with:
  * a dense SwiGLU with the same active parameters per token (width k*f): same FLOPs,
    so the ratio is the cost of routing and dispatch;
  * the reference dispatch (`dispatch="loop"`, Mixtral's loop over experts), eager.
Both forward and forward+backward, eager and `torch.compile(fullgraph=True)`; medians
of several repeats after warm-up, all in one process.

    python benchmarks/moe_layer.py            # E=8, k=2, d=512, f=1408, T=4096, fp32
    python benchmarks/moe_layer.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moecompose.model.config import AuxLossSpec, MoEFFNSpec, TopKRouterSpec
from moecompose.model.moe import MoEFFN
from moecompose.model.parts import SwiGLU


class DenseFFN(nn.Module):
    """SwiGLU returning (y, None) so it is called like `MoEFFN`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.ffn(x), None


def forward_step(layer: nn.Module, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def forward_backward_step(layer: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """One training step's forward and backward; gradients start from None as after
    `optimizer.zero_grad()`."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = layer(x)
        if aux is None:
            y.backward(grad)
        else:
            torch.autograd.backward((y, aux), (grad, torch.ones_like(aux)))

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
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1408, help="expert width f")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.experts, args.top_k, args.dim, args.hidden, args.tokens = 4, 2, 64, 96, 256
        args.repeats = 5
    warmup = 2

    torch.manual_seed(0)
    E, k, d, f, T = args.experts, args.top_k, args.dim, args.hidden, args.tokens
    spec = MoEFFNSpec(
        num_experts=E,
        intermediate_size=f,
        router=TopKRouterSpec(k=k, normalize=True),
        aux_loss=AuxLossSpec(load_balance=0.01, z_loss=0.001),
    )
    moe = MoEFFN(d, spec, dispatch="grouped")
    loop = MoEFFN(d, spec, dispatch="loop")
    loop.load_state_dict(moe.state_dict())
    dense = DenseFFN(d, k * f)
    x = torch.randn(T, d, requires_grad=True)
    grad = torch.randn(T, d)

    print(
        f"MoE FFN E={E} top-{k} d={d} f={f} vs dense f={k * f}; T={T}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    layers: dict[str, nn.Module] = {
        "dense eager": dense,
        "moe loop eager (reference)": loop,
        "moe grouped eager": moe,
    }
    if not args.no_compile:
        layers["dense compiled"] = torch.compile(dense, fullgraph=True)
        layers["moe grouped compiled"] = torch.compile(moe, fullgraph=True)
    fwd = median_seconds(
        {name: forward_step(layer, x) for name, layer in layers.items()}, args.repeats, warmup
    )
    fwd_bwd = median_seconds(
        {name: forward_backward_step(layer, x, grad) for name, layer in layers.items()},
        args.repeats,
        warmup,
    )
    rows = {name: (fwd[name], fwd_bwd[name]) for name in layers}

    print(f"{'':28s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
    for name, (t_fwd, t_fwd_bwd) in rows.items():
        print(f"{name:28s} {t_fwd * 1e3:9.1f} {t_fwd_bwd * 1e3:11.1f}")

    def ratio(name: str, a: str, b: str) -> None:
        if a in rows and b in rows:
            r_fwd, r_fwd_bwd = (rows[a][i] / rows[b][i] for i in range(2))
            print(f"{name:44s} fwd {r_fwd:5.2f}x   fwd+bwd {r_fwd_bwd:5.2f}x")

    print("ratios (lower is better):")
    ratio("moe eager / dense eager", "moe grouped eager", "dense eager")
    ratio("moe compiled / dense compiled", "moe grouped compiled", "dense compiled")
    ratio("moe eager / reference loop eager", "moe grouped eager", "moe loop eager (reference)")
    ratio(
        "moe compiled / reference loop eager", "moe grouped compiled", "moe loop eager (reference)"
    )


if __name__ == "__main__":
    main()
