"""The gate activations of the FFNs and experts (`ModelConfig.hidden_act`): `silu` makes
them SwiGLU (Llama), `gelu_tanh` GeGLU (Gemma), with aten's own backward kernels for the
hand-written backward of the grouped expert op."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with its tanh approximation (transformers' `gelu_pytorch_tanh`)."""
    return F.gelu(x, approximate="tanh")


GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,  # SwiGLU (Llama)
    "gelu_tanh": gelu_tanh,  # GeGLU (Gemma)
}


def gate_activation_backward(activation: str, grad: Tensor, g: Tensor) -> Tensor:
    """`grad * act'(g)`, written into `grad` (aten's `silu_backward` / `gelu_backward`)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=grad)
    return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate="tanh", grad_input=grad)
