"""PESC adapter-experts layer speed against the dense FFN it wraps.

The PESC layer (shared SwiGLU of width f, E adapters of bottleneck r, top-k) is compared
with:
  * the dense SwiGLU alone (width f): the ratio is the whole cost of routing + adapters;
  * the dense SwiGLU plus one always-on adapter (width r): the compute of k=1 without any
    routing, so the ratio to it is the cost of dispatch;
  * the reference loop dispatch (`dispatch="loop"`), eager.
Forward and forward+backward, eager and `torch.compile(fullgraph=True)` (the compiled PESC
layer is checked to compile to one graph), medians after warm-up, in one process.

    python benchmarks/adapters.py            # E=8, k=2, d=512, f=1408, r=64, T=4096, fp32
    python benchmarks/adapters.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from moe_layer import DenseFFN
from timing import print_report, time_modules
from torch import Tensor, nn

from moecompose.model.adapters import AdapterMoEFFN
from moecompose.model.config import AdapterFFNConfig, AuxLossConfig, TopKRouterConfig
from moecompose.model.parts import SwiGLU


class DenseWithAdapter(nn.Module):
    """SwiGLU followed by one adapter `u + up(gelu(down(u)))`, returning (y, None)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.ffn = SwiGLU(dim, hidden)
        self.down = nn.Linear(dim, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, dim, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        u = self.ffn(x)
        return u + self.up(F.gelu(self.down(u))), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1408, help="shared FFN width f")
    parser.add_argument("--bottleneck", type=int, default=64, help="adapter width r")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.experts, args.dim, args.hidden, args.bottleneck, args.tokens = 4, 64, 96, 8, 256
        args.repeats = 5
    warmup = 2

    torch.manual_seed(0)
    E, k, d, f, r, T = args.experts, args.top_k, args.dim, args.hidden, args.bottleneck, args.tokens
    spec = AdapterFFNConfig(
        num_experts=E,
        intermediate_size=f,
        bottleneck=r,
        router=TopKRouterConfig(k=k),
        aux_loss=AuxLossConfig(load_balance=0.01, z_loss=0.001),
    )
    pesc = AdapterMoEFFN(d, spec, dispatch="grouped")
    with torch.no_grad():
        pesc.adapters.up_proj.normal_(0, 0.02)  # nonzero, as after some training
    loop = AdapterMoEFFN(d, spec, dispatch="loop")
    loop.load_state_dict(pesc.state_dict())
    dense, dense_adapter = DenseFFN(d, f), DenseWithAdapter(d, f, r)
    x = torch.randn(T, d, requires_grad=True)
    grad = torch.randn(T, d)

    print(
        f"PESC E={E} top-{k} d={d} f={f} r={r}; T={T}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    layers: dict[str, nn.Module] = {
        "dense eager": dense,
        "dense+adapter eager": dense_adapter,
        "pesc loop eager (reference)": loop,
        "pesc grouped eager": pesc,
    }
    if not args.no_compile:
        explanation = torch._dynamo.explain(pesc)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        layers["dense compiled"] = torch.compile(dense, fullgraph=True)
        layers["dense+adapter compiled"] = torch.compile(dense_adapter, fullgraph=True)
        layers["pesc grouped compiled"] = torch.compile(pesc, fullgraph=True)
    rows = time_modules(layers, x, grad, args.repeats, warmup)
    print_report(rows, [
        ("pesc eager / dense eager", "pesc grouped eager", "dense eager"),
        ("pesc eager / dense+adapter eager", "pesc grouped eager", "dense+adapter eager"),
        ("pesc compiled / dense compiled", "pesc grouped compiled", "dense compiled"),
        ("pesc compiled / dense+adapter compiled", "pesc grouped compiled", "dense+adapter compiled"),
        ("pesc eager / reference loop eager", "pesc grouped eager", "pesc loop eager (reference)"),
    ])

if __name__ == "__main__":
    main()
