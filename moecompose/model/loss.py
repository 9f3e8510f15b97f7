"""Cross-entropy fused with the output projection, a chunk of tokens at a time.

`linear_cross_entropy(h, weight, targets)` is
`F.cross_entropy(h @ weight.T, targets, ignore_index=-100)` (the mean over the targets
that are not -100) without the [N, V] logits: the rows are taken `chunk` at a time, and
each chunk's logits [c, V] live only while that chunk is processed. With autograd the
gradients are computed in the same pass (the chunk's `softmax - onehot` is all the
backward needs), so the only [N, *] tensors are h and its gradient [N, d], and the
weight's gradient [V, d] is accumulated chunk by chunk. The unfused path keeps the logits,
their log-softmax and the logits' gradient, three [N, V] fp32 tensors: at 32k tokens and
a 150k vocabulary that is 58 GB, here a few chunks' worth.

`softcap` (Gemma 2's final logit soft-capping, `cap * tanh(z / cap)`) is applied to the
logits before the softmax, and its derivative in the gradient.

Forward ops are `torch.library.custom_op`s (opaque to `torch.compile`, like the grouped
experts). Under autocast they run like `mm` (`autocast_rule`): h and the weight in the
autocast dtype, the logits' softmax in fp32, the weight gradient summed over chunks in
fp32 and returned in the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecompose.model.grouped_swiglu import autocast_rule

IGNORE = -100
CHUNK_ELEMENTS = 1 << 20  # logits per chunk: 4 MiB in fp32


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab`: about `CHUNK_ELEMENTS` logits, 16 rows
    at least."""
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax and the sums: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunk(
    h: Tensor, weight: Tensor, targets: Tensor, softcap: float, grads: bool
) -> tuple[Tensor, Tensor | None]:
    """(sum of the chunk's losses [], d loss_sum / d logits [c, V] or None), both in
    `_wide(h.dtype)`."""
    z = torch.mm(h, weight.t()).to(_wide(h.dtype))  # [c, V]
    tanh = None
    if softcap:
        tanh = z.div_(softcap).tanh_()
        z = tanh * softcap
    lse = torch.logsumexp(z, dim=1)  # [c]
    valid = targets != IGNORE
    index = targets.clamp_min(0)[:, None]  # [c, 1]
    loss = ((lse - z.gather(1, index).squeeze(1)) * valid).sum()
    if not grads:
        return loss, None
    # softmax [c, V], rows that are not targets all zero: exp(z - inf) (no host sync)
    p = z.sub_(lse.masked_fill(~valid, float("inf"))[:, None]).exp_()
    p.scatter_add_(1, index, -valid[:, None].to(p.dtype))
    if tanh is not None:
        p.mul_(1 - tanh.square_())
    return loss, p


def _forward(
    h: Tensor, weight: Tensor, targets: Tensor, softcap: float, chunk: int,
    input_grad: bool, weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    N = h.shape[0]
    grads = input_grad or weight_grad
    dh = torch.empty_like(h) if input_grad else h.new_empty(0)
    wide = _wide(h.dtype)
    dw = weight.new_zeros(weight.shape, dtype=wide) if weight_grad else None
    total = h.new_zeros((), dtype=wide)
    for s in range(0, N, chunk):
        hc = h[s : s + chunk]
        loss, p = _chunk(hc, weight, targets[s : s + chunk], softcap, grads)
        total += loss
        if p is None:
            continue
        p = p.to(h.dtype)
        if input_grad:
            torch.mm(p, weight, out=dh[s : s + chunk])  # [c, d]
        if dw is not None:
            if h.dtype == wide:
                dw.addmm_(p.t(), hc)  # [V, d]
            else:
                dw += torch.mm(p.t(), hc)
    scale = 1.0 / (targets != IGNORE).sum().to(wide)  # inf without targets: NaN, as F
    if input_grad:
        dh.mul_(scale.to(dh.dtype))
    dweight = weight.new_empty(0) if dw is None else dw.mul_(scale).to(weight.dtype)
    return total * scale, dh, dweight


@torch.library.custom_op("moecompose::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, softcap: float, chunk: int,
    input_grad: bool, weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss [] (fp32, fp64 for fp64 h), its gradient for h [N, d], for the weight [V, d]); the
    gradients not asked for come back empty. No host sync (rows that are not targets are
    zeroed by the arithmetic, not by a branch), so CUDA graphs may capture it."""
    return _forward(h, weight, targets, softcap, chunk, input_grad, weight_grad)


@_linear_cross_entropy.register_fake
def _(h, weight, targets, softcap, chunk, input_grad, weight_grad):
    dh = torch.empty_like(h) if input_grad else h.new_empty(0)
    dw = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return h.new_empty((), dtype=_wide(h.dtype)), dh, dw


def _setup_context(ctx, inputs, output) -> None:
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)


def _backward(ctx, dloss, _dh, _dw):
    dh, dw = ctx.saved_tensors
    input_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (
        dh * dloss.to(dh.dtype) if input_grad else None,
        dw * dloss.to(dw.dtype) if weight_grad else None,
        None, None, None, None, None,
    )


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
autocast_rule("linear_cross_entropy", cast=True)


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` (soft-capped if `softcap`) against
    `targets` (-100: not a target), fp32 [] (fp64 for fp64 h): h [N, d], weight [V, d], targets [N].

    Equals `F.cross_entropy(h @ weight.T, targets, ignore_index=-100)` (NaN when no row is
    a target), gradients included, without ever holding the [N, V] logits."""
    rows = chunk or chunk_rows(weight.shape[0])
    needs = torch.is_grad_enabled()
    input_grad = needs and h.requires_grad
    weight_grad = needs and weight.requires_grad
    loss, _, _ = _linear_cross_entropy(
        h, weight, targets, float(softcap or 0.0), rows, input_grad, weight_grad
    )
    return loss
