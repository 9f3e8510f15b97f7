"""Nexus router cost against a plain linear top-k router in the same MoE FFN layer.

Two `MoEFFN` layers that differ only in their router: a Nexus router (expert embeddings
`e` [E, d] projected from frozen domain embeddings [E, m] by `w1`, `w2`) and a `TopKRouter`
whose weight is set to the Nexus layer's `e`, so both route every token to the same
experts; experts, shared expert (the seed FFN, width f) and aux loss are the same weights
and settings. Each layer is timed in
  * eval mode: Nexus reads the expert embeddings cached at `.eval()`, so the forward
    should cost what the top-k layer costs (read the fwd column);
  * train mode: Nexus projects `e` once per forward and backpropagates into `w1`, `w2`
    (read the fwd+bwd column);
eager and `torch.compile(fullgraph=True)`, forward (no grad) and forward+backward, medians
of interleaved repeats after warm-up, in one process. The projection alone (`e` from the
domain embeddings, forward and forward+backward into `w1`, `w2`) is timed alongside and
reported as a percentage of the train-mode Nexus layer.

    python benchmarks/nexus.py            # E=8, top-1, d=512, f=1408, m=512, T=4096, fp32
    python benchmarks/nexus.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse

import torch
from timing import (
    Call,
    Step,
    Timings,
    forward_backward_step,
    forward_step,
    median_seconds,
    print_report,
)
from torch import Tensor, nn

from moecompose.model.config import (
    AuxLossConfig,
    MoEFFNConfig,
    MoERouterConfig,
    NexusRouterConfig,
    SharedExpertConfig,
    TopKRouterConfig,
)
from moecompose.model.moe import MoEFFN


def max_load(layer: MoEFFN, x: Tensor) -> float:
    """Tokens routed to the busiest expert over the mean per expert (1.0 = balanced)."""
    with torch.no_grad():
        counts = torch.bincount(layer.router(x).indices.reshape(-1), minlength=layer.num_experts)
    return (counts.max() / counts.float().mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1408, help="expert and shared expert width f")
    parser.add_argument("--domain-dim", type=int, default=512, help="domain embedding width m")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.experts, args.dim, args.hidden, args.domain_dim, args.tokens = 4, 64, 96, 32, 256
        args.repeats = 5
    warmup = 2

    torch.manual_seed(0)
    E, k, d, f, m, T = args.experts, args.top_k, args.dim, args.hidden, args.domain_dim, args.tokens

    def spec(router: MoERouterConfig) -> MoEFFNConfig:
        return MoEFFNConfig(
            num_experts=E,
            intermediate_size=f,
            router=router,
            shared_expert=SharedExpertConfig(intermediate_size=f, gate=False),
            aux_loss=AuxLossConfig(load_balance=0.05),
        )

    nexus_spec = spec(NexusRouterConfig(domain_dim=m, k=k, normalize=False))
    topk_spec = spec(TopKRouterConfig(k=k, normalize=False))
    nexus_train = MoEFFN(d, nexus_spec)
    with torch.no_grad():  # unit-RMS domain embeddings, as a build writes them
        nexus_train.router.domain_embeddings.normal_()
    shared = {n: t for n, t in nexus_train.state_dict().items() if not n.startswith("router.")}
    topk_train = MoEFFN(d, topk_spec)
    topk_train.load_state_dict(shared, strict=False)
    with torch.no_grad():
        topk_train.router.weight.copy_(nexus_train.router.project())
    nexus_eval = MoEFFN(d, nexus_spec).eval()
    nexus_eval.load_state_dict(nexus_train.state_dict())  # refreshes the cached embeddings
    topk_eval = MoEFFN(d, topk_spec).eval()
    topk_eval.load_state_dict(topk_train.state_dict())
    x = torch.randn(T, d, requires_grad=True)
    grad = torch.randn(T, d)

    with torch.no_grad():  # the two layers compute the same function
        y_nexus, y_topk = nexus_eval(x)[0], topk_eval(x)[0]
        assert torch.equal(nexus_eval.router(x).indices, topk_eval.router(x).indices)
        torch.testing.assert_close(y_nexus, y_topk)

    print(
        f"MoE FFN E={E} top-{k} d={d} f={f} + shared expert f={f}, Nexus m={m} vs linear "
        f"top-k router; T={T}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"busiest expert / mean load (same routing for both): {max_load(nexus_eval, x):.2f}")

    layers: dict[str, nn.Module] = {
        "topk eval eager": topk_eval,
        "nexus eval eager": nexus_eval,
        "topk train eager": topk_train,
        "nexus train eager": nexus_train,
    }
    if not args.no_compile:
        for name, layer in list(layers.items()):
            layers[name.replace("eager", "compiled")] = torch.compile(layer, fullgraph=True)
    calls: dict[str, tuple[Call, list[nn.Parameter]]] = {
        n: (layer, list(layer.parameters())) for n, layer in layers.items()
    }

    router = nexus_train.router
    projections: dict[str, Call] = {"nexus projection eager": lambda _: router.project()}
    if not args.no_compile:
        project = torch.compile(router.project, fullgraph=True)
        projections["nexus projection compiled"] = lambda _: project()
    grad_e = torch.randn(E, d)
    router_params = list(router.parameters())

    fwd_steps: dict[str, Step] = {n: forward_step(c, x) for n, (c, _) in calls.items()}
    fwd_bwd_steps: dict[str, Step] = {
        n: forward_backward_step(c, p, x, grad) for n, (c, p) in calls.items()
    }
    for name, call in projections.items():
        fwd_steps[name] = forward_step(call, x)
        fwd_bwd_steps[name] = forward_backward_step(call, router_params, x, grad_e)
    fwd = median_seconds(fwd_steps, args.repeats, warmup)
    fwd_bwd = median_seconds(fwd_bwd_steps, args.repeats, warmup)
    rows: Timings = {name: (fwd[name], fwd_bwd[name]) for name in fwd_steps}

    print_report(rows, [
        ("nexus eval / topk eval, eager", "nexus eval eager", "topk eval eager"),
        ("nexus eval / topk eval, compiled", "nexus eval compiled", "topk eval compiled"),
        ("nexus train / topk train, eager", "nexus train eager", "topk train eager"),
        ("nexus train / topk train, compiled", "nexus train compiled", "topk train compiled"),
    ])
    print("projection alone (e from the domain embeddings) / nexus train layer:")
    for mode in ("eager", "compiled"):
        a, b = f"nexus projection {mode}", f"nexus train {mode}"
        if a in rows and b in rows:
            p_fwd, p_fwd_bwd = (100 * rows[a][i] / rows[b][i] for i in range(2))
            print(f"  {mode:10s} fwd {p_fwd:6.2f}%   fwd+bwd {p_fwd_bwd:6.2f}%")


if __name__ == "__main__":
    main()
