"""Helpers shared by the tests: logits from transformers and from moecompose, gradients."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file

import moecompose

IDS = torch.tensor([[5, 9, 23, 7, 41, 3, 60, 17, 8], [1, 44, 12, 90, 2, 33, 71, 6, 19]])


def hf_logits(path: Path, cls_name: str = "AutoModelForCausalLM") -> torch.Tensor:
    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), f"transformers reports loading problems: {info}"
    with torch.no_grad():
        return model.eval()(IDS).logits


def our_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return moecompose.load(path)(IDS).logits


def weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def training_grads(
    run: Callable[[torch.Tensor], Any], model: torch.nn.Module, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradients of `model`'s parameters after one step of a fixed loss on `run(x)` (the
    model itself or a compiled form of it): every parameter that receives one."""
    model.zero_grad()
    out = run(x)
    (out.logits.square().mean() + out.aux_loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
