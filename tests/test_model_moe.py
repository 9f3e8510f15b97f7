"""The MoE FFN: grouped dispatch against the reference loop, routing, aux losses, shared expert."""

from __future__ import annotations

import pytest
import torch

from moecompose.model.config import (
    AuxLossConfig,
    MoEFFNConfig,
    SharedExpertConfig,
    TopKRouterConfig,
)
from moecompose.model.grouped_swiglu import LOOP_OPS
from moecompose.model.moe import MoEFFN, expert_slices
from moecompose.model.routing import expert_counts

DIM, HIDDEN = 16, 24


def moe_spec(
    num_experts: int = 6,
    k: int = 2,
    normalize: bool = True,
    shared: SharedExpertConfig | None = None,
    load_balance: float = 0.01,
    z_loss: float = 0.001,
) -> MoEFFNConfig:
    return MoEFFNConfig(
        num_experts=num_experts,
        intermediate_size=HIDDEN,
        router=TopKRouterConfig(k=k, normalize=normalize),
        shared_expert=shared,
        aux_loss=AuxLossConfig(load_balance=load_balance, z_loss=z_loss),
    )


def grads_of(layer: MoEFFN, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    torch.autograd.backward((y, aux), (upstream, torch.ones_like(aux)))
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    grads["y"] = y.detach()
    grads["aux"] = aux.detach()
    return grads


@pytest.mark.parametrize(
    ("num_experts", "k", "tokens", "shared"),
    [
        (6, 2, 37, None),
        (4, 1, 50, None),
        (5, 3, 20, SharedExpertConfig(intermediate_size=12, gate=True)),
        (16, 2, 3, None),  # most experts receive no token
    ],
)
def test_grouped_dispatch_matches_loop_forward_and_gradients(
    num_experts: int, k: int, tokens: int, shared: SharedExpertConfig | None
) -> None:
    torch.manual_seed(0)
    spec = moe_spec(num_experts, k, shared=shared)
    grouped = MoEFFN(DIM, spec, dispatch="grouped")
    loop = MoEFFN(DIM, spec, dispatch="loop")
    loop.load_state_dict(grouped.state_dict())
    x, upstream = torch.randn(tokens, DIM), torch.randn(tokens, DIM)
    fast, reference = grads_of(grouped, x, upstream), grads_of(loop, x, upstream)
    assert fast.keys() == reference.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("frozen", ["experts", "input"])
def test_grouped_dispatch_matches_loop_with_frozen_parts(frozen: str) -> None:
    torch.manual_seed(0)
    layers = [MoEFFN(DIM, moe_spec(), dispatch=d) for d in ("grouped", "loop")]
    layers[1].load_state_dict(layers[0].state_dict())
    x, upstream = torch.randn(19, DIM), torch.randn(19, DIM)
    results = []
    for layer in layers:
        if frozen == "experts":
            layer.experts.requires_grad_(False)
        xi = x.clone().requires_grad_(frozen != "input")
        y, _ = layer(xi)
        y.backward(upstream)
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        results.append((y.detach(), xi.grad, grads))
    (y_fast, dx_fast, fast), (y_ref, dx_ref, reference) = results
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=0)
    assert (dx_fast is None) == (frozen == "input")
    if dx_fast is not None:
        torch.testing.assert_close(dx_fast, dx_ref, atol=1e-5, rtol=0)
    assert fast.keys() == reference.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], atol=1e-5, rtol=0, msg=name)


def test_inference_path_matches_training_path() -> None:
    torch.manual_seed(0)
    layer = MoEFFN(DIM, moe_spec(num_experts=5, k=2))
    x = torch.randn(23, DIM)
    training = layer(x)[0]
    with torch.no_grad():
        inference = layer(x)[0]
    torch.testing.assert_close(inference, training.detach(), atol=0, rtol=0)


def test_experts_without_tokens_get_zero_gradients() -> None:
    torch.manual_seed(0)
    layer = MoEFFN(DIM, moe_spec(num_experts=16, k=1))
    x = torch.randn(2, DIM)
    y, _ = layer(x)
    y.sum().backward()
    used = layer.router(x).indices.unique()
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    for p in (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj):
        assert torch.all(p.grad[unused] == 0)
        assert torch.all(p.grad[used].abs().sum(dim=(1, 2)) > 0)


def test_custom_ops_pass_opcheck() -> None:
    torch.manual_seed(0)
    T, k, E = 9, 2, 4
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    order = indices.reshape(-1).argsort(stable=True)
    counts = expert_counts(indices, E)
    x = torch.randn(T, DIM, requires_grad=True)
    gate, up = (torch.randn(E, HIDDEN, DIM, requires_grad=True) for _ in range(2))
    down = torch.randn(E, DIM, HIDDEN, requires_grad=True)
    torch.library.opcheck(LOOP_OPS.forward, (x, order, counts, gate, up, down))
    frozen = (w.detach() for w in (gate, up, down))
    torch.library.opcheck(LOOP_OPS.inference, (x.detach(), order, counts, *frozen))


SYNCING_OPS = {  # kernels that read tensor values on the host
    "grouped_swiglu", "grouped_swiglu_inference", "grouped_swiglu_backward",  # counts.tolist()
    "grouped_linear", "grouped_linear_backward",
}


def test_ops_that_sync_with_the_host_are_kept_out_of_cuda_graphs() -> None:
    """Every moecompose op whose kernel reads tensor values on the host carries
    `cudagraph_unsafe` (Inductor runs it outside CUDA graphs); the others, the grouped-GEMM
    expert ops among them, do not, so CUDA graphs capture them."""
    import moecompose.model.causal_lm  # noqa: F401  (defines every op)

    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("moecompose::")}
    assert names >= SYNCING_OPS | {"grouped_swiglu_gmm", "grouped_linear_gmm",
                                   "softcapped_attention", "kv_cache_slots",
                                   "linear_cross_entropy"}
    for name in names:
        tags = getattr(torch.ops.moecompose, name).default.tags
        assert (torch.Tag.cudagraph_unsafe in tags) == (name in SYNCING_OPS), name


def test_expert_counts_count_assignments() -> None:
    indices = torch.tensor([[0, 2], [2, 1], [2, 0]])
    assert expert_counts(indices, 4).tolist() == [2, 1, 3, 0]


def test_router_renormalises_only_when_asked() -> None:
    torch.manual_seed(0)
    x = torch.randn(11, DIM)
    normalized = MoEFFN(DIM, moe_spec(k=2, normalize=True)).router
    raw = MoEFFN(DIM, moe_spec(k=2, normalize=False)).router
    raw.load_state_dict(normalized.state_dict())
    w_norm, idx, logits = normalized(x)
    w_raw, idx_raw, _ = raw(x)
    assert torch.equal(idx, idx_raw)
    assert logits.dtype == torch.float32 and logits.shape == (11, 6)
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(11))
    torch.testing.assert_close(w_raw, logits.softmax(-1).gather(1, idx))
    assert torch.all(w_raw.sum(-1) < 1)


def test_aux_losses_equal_the_formulas() -> None:
    torch.manual_seed(0)
    E, k, T, lb, z = 4, 2, 10, 0.01, 0.001
    layer = MoEFFN(DIM, moe_spec(num_experts=E, k=k, load_balance=lb, z_loss=z))
    x = torch.randn(T, DIM)
    _, aux = layer(x)

    logits = x @ layer.router.weight.T
    probs = logits.softmax(-1)
    chosen = probs.topk(k, dim=-1).indices
    balance = 0.0
    for i in range(E):
        f_i = (chosen == i).sum().item() / (T * k)
        p_i = probs[:, i].mean().item()
        balance += f_i * p_i
    balance *= E
    z_term = sum(torch.log(torch.exp(logits[t]).sum()).item() ** 2 for t in range(T)) / T
    assert aux.item() == pytest.approx(lb * balance + z * z_term, rel=1e-5)


def test_aux_loss_is_zero_without_coefficients() -> None:
    layer = MoEFFN(DIM, moe_spec(load_balance=0.0, z_loss=0.0))
    _, aux = layer(torch.randn(5, DIM))
    assert aux.item() == 0.0


def test_load_balance_gradient_reaches_router() -> None:
    torch.manual_seed(0)
    layer = MoEFFN(DIM, moe_spec(load_balance=1.0, z_loss=0.0))
    _, aux = layer(torch.randn(8, DIM))
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_adds_its_output_scaled_by_its_gate(gated: bool) -> None:
    torch.manual_seed(0)
    with_shared = MoEFFN(DIM, moe_spec(shared=SharedExpertConfig(intermediate_size=12, gate=gated)))
    routed_only = MoEFFN(DIM, moe_spec())
    routed_only.load_state_dict(with_shared.state_dict(), strict=False)
    x = torch.randn(7, DIM)
    with torch.no_grad():
        shared = with_shared.shared_expert(x)
        if gated:
            shared = shared * torch.sigmoid(x @ with_shared.shared_expert_gate.weight.T)
        expected = routed_only(x)[0] + shared
        torch.testing.assert_close(with_shared(x)[0], expected, atol=1e-6, rtol=0)
    names = set(with_shared.state_dict())
    assert ("shared_expert_gate.weight" in names) == gated
    assert {"shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"} <= names


def test_moe_tensor_names_and_shapes_follow_the_artifact_format() -> None:
    layer = MoEFFN(DIM, moe_spec(num_experts=3, shared=SharedExpertConfig(intermediate_size=12, gate=True)))
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {
        "router.weight": (3, DIM),
        "experts.gate_proj": (3, HIDDEN, DIM),
        "experts.up_proj": (3, HIDDEN, DIM),
        "experts.down_proj": (3, DIM, HIDDEN),
        "shared_expert.gate_proj.weight": (12, DIM),
        "shared_expert.up_proj.weight": (12, DIM),
        "shared_expert.down_proj.weight": (DIM, 12),
        "shared_expert_gate.weight": (1, DIM),
    }


def test_grouped_dispatch_in_bfloat16_is_close_to_loop() -> None:
    torch.manual_seed(0)
    grouped = MoEFFN(DIM, moe_spec()).to(torch.bfloat16)
    loop = MoEFFN(DIM, moe_spec(), dispatch="loop").to(torch.bfloat16)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(13, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        fast, reference = grouped(x)[0], loop(x)[0]
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference.float(), atol=2e-2, rtol=2e-2)


def test_expert_slices_are_one_unbind_per_stacked_tensor() -> None:
    """Each expert's views equal `t[e]` (None stays None), and the slices of one tensor
    hang off a single unbind node, so backward stacks E gradients once instead of
    zero-filling a whole-stack gradient for every expert."""
    torch.manual_seed(0)
    gate = torch.randn(4, 3, 2, requires_grad=True)
    down = torch.randn(4, 2, 3, requires_grad=True)
    slices = expert_slices(gate, None, down)
    assert len(slices) == 4
    for e, (g, missing, d) in enumerate(slices):
        assert missing is None
        assert torch.equal(g, gate[e]) and torch.equal(d, down[e])
    assert len({id(g.grad_fn) for g, _, _ in slices}) == 1
    assert type(slices[0][0].grad_fn).__name__ == "UnbindBackward0"
    sum((g * (e + 1)).sum() + d.sum() for e, (g, _, d) in enumerate(slices)).backward()
    assert torch.equal(gate.grad, torch.arange(1.0, 5.0)[:, None, None].expand(4, 3, 2))
    assert torch.equal(down.grad, torch.ones(4, 2, 3))


def test_gelu_tanh_grouped_dispatch_matches_loop_in_fp64() -> None:
    """GeGLU experts (Gemma): the grouped op's forward and hand-written backward against
    autograd through the loop dispatch, and the shared expert's activation, in fp64."""
    torch.manual_seed(0)
    spec = moe_spec(5, 2, shared=SharedExpertConfig(intermediate_size=12, gate=True))
    grouped = MoEFFN(DIM, spec, dispatch="grouped", activation="gelu_tanh").double()
    loop = MoEFFN(DIM, spec, dispatch="loop", activation="gelu_tanh").double()
    loop.load_state_dict(grouped.state_dict())
    x, upstream = torch.randn(29, DIM, dtype=torch.float64), torch.randn(29, DIM, dtype=torch.float64)
    fast, reference = grads_of(grouped, x, upstream), grads_of(loop, x, upstream)
    assert fast.keys() == reference.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], atol=1e-12, rtol=0, msg=name)
    silu = MoEFFN(DIM, spec, dispatch="grouped").double()
    silu.load_state_dict(grouped.state_dict())
    assert not torch.allclose(silu(x)[0], fast["y"])  # the activation is GELU's, not SiLU's
