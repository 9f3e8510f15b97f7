"""Mixture of Tokens layer speed against the dense FFN of equal active compute.

In a Mixture-of-Tokens layer every expert runs once per group and position, on one mixed
token, so each token costs E/G expert evaluations of width f. The dense twin is a SwiGLU
of width f * E / G: the same FFN FLOPs per token, so the ratio is the cost of mixing
(controller, group softmax, the two group `bmm`s) and of running E narrow experts instead
of one wide FFN. The defaults (E = G = 32) make the twin exactly the f-wide dense FFN.
Forward and forward+backward, eager and `torch.compile(fullgraph=True)` (checked to
compile to one graph without breaks), medians after warm-up, in one process.

    python benchmarks/mot.py            # E=32, G=32, d=512, f=1408, B=32, S=128, fp32
    python benchmarks/mot.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse

import torch
from moe_layer import DenseFFN
from timing import print_report, time_modules
from torch import Tensor, nn

from moecompose.model.config import MoEFFNConfig, TokenMixingRouterConfig
from moecompose.model.token_mixing import TokenMixingFFN


class MixtureOfTokens(nn.Module):
    """`TokenMixingFFN` returning (y, None): its aux loss is a constant zero."""

    def __init__(self, layer: TokenMixingFFN) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.layer(x)[0], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--group", type=int, default=32, help="group size G")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1408, help="expert width f")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.experts, args.group, args.dim, args.hidden = 4, 2, 64, 96
        args.batch, args.seq, args.repeats = 8, 32, 5
    warmup = 2

    torch.manual_seed(0)
    E, G, d, f, B, S = args.experts, args.group, args.dim, args.hidden, args.batch, args.seq
    twin = max(1, round(f * E / G))
    spec = MoEFFNConfig(
        num_experts=E, intermediate_size=f, router=TokenMixingRouterConfig(group_size=G)
    )
    mot = MixtureOfTokens(TokenMixingFFN(d, spec))
    dense = DenseFFN(d, twin)
    x = torch.randn(B, S, d, requires_grad=True)
    grad = torch.randn(B, S, d)

    print(
        f"Mixture of Tokens E={E} G={G} d={d} f={f} vs dense f={twin}; B={B} S={S}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    layers: dict[str, nn.Module] = {"dense eager": dense, "mot eager": mot}
    if not args.no_compile:
        explanation = torch._dynamo.explain(mot)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        layers["dense compiled"] = torch.compile(dense, fullgraph=True)
        layers["mot compiled"] = torch.compile(mot, fullgraph=True)
    rows = time_modules(layers, x, grad, args.repeats, warmup)
    print_report(rows, [
        ("mot eager / dense eager", "mot eager", "dense eager"),
        ("mot compiled / dense compiled", "mot compiled", "dense compiled"),
        ("mot compiled / mot eager", "mot compiled", "mot eager"),
    ])
    if not args.no_compile:
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        expected = 1 + 2 * 2  # explain, then 2 compiled layers x (no_grad, grad)
        print(f"compiled graphs: {graphs} (expected {expected}: no recompiles)")


if __name__ == "__main__":
    main()
