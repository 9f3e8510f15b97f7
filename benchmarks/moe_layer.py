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

import torch
from timing import print_report, time_modules
from torch import Tensor, nn

from moecompose.model.config import AuxLossConfig, MoEFFNConfig, TopKRouterConfig
from moecompose.model.moe import MoEFFN
from moecompose.model.parts import SwiGLU


class DenseFFN(nn.Module):
    """SwiGLU returning (y, None) so it is called like `MoEFFN`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.ffn(x), None


def moe_spec(experts: int, top_k: int, hidden: int) -> MoEFFNConfig:
    """The benchmarked MoE layer: top-k (renormalised), load balancing and z-loss on."""
    return MoEFFNConfig(
        num_experts=experts,
        intermediate_size=hidden,
        router=TopKRouterConfig(k=top_k, normalize=True),
        aux_loss=AuxLossConfig(load_balance=0.01, z_loss=0.001),
    )


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
    spec = moe_spec(E, k, f)
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
    rows = time_modules(layers, x, grad, args.repeats, warmup)
    print_report(rows, [
        ("moe eager / dense eager", "moe grouped eager", "dense eager"),
        ("moe compiled / dense compiled", "moe grouped compiled", "dense compiled"),
        ("moe eager / reference loop eager", "moe grouped eager", "moe loop eager (reference)"),
        ("moe compiled / reference loop eager", "moe grouped compiled", "moe loop eager (reference)"),
    ])

if __name__ == "__main__":
    main()
