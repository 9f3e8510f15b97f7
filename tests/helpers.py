"""Helpers shared by the tests: logits from transformers and from moecompose, gradients."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import moecompose
from moecompose.model import compile_model

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
CORPUS = SPECS / "data" / "train"  # the bundled two-domain training corpus
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


def assert_compiled_inference_matches_eager(
    model: torch.nn.Module, shapes: list[tuple[int, int]], ids: Callable[[int, int], torch.Tensor]
) -> None:
    """`compile_model(model)` gives eager's logits and aux loss at every (batch, length) of
    `shapes` without gradients, and compiles one graph for all of them (call after
    `torch._dynamo.reset()` and `counters.clear()`)."""
    compiled = compile_model(model)
    with torch.no_grad():
        for batch, seq in shapes:
            x = ids(batch, seq)
            out = compiled(x)
            assert counters["stats"]["unique_graphs"] == 1, f"recompiled at {batch}x{seq}"
            reference = model(x)
            torch.testing.assert_close(out.logits, reference.logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(out.aux_loss, reference.aux_loss, atol=1e-6, rtol=1e-4)


def assert_compiled_training_matches_eager(
    model: torch.nn.Module, shapes: list[tuple[int, int]], ids: Callable[[int, int], torch.Tensor]
) -> None:
    """`compile_model(model)` trains with eager's gradients at every (batch, length) of
    `shapes`, and compiles one graph for all of them (call after `torch._dynamo.reset()`
    and `counters.clear()`)."""
    compiled = compile_model(model)
    for batch, seq in shapes:
        x = ids(batch, seq)
        fast, slow = training_grads(compiled, model, x), training_grads(model, model, x)
        assert counters["stats"]["unique_graphs"] == 1, f"recompiled at {batch}x{seq}"
        assert fast.keys() == slow.keys()
        for name in slow:
            torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4, msg=name)


def write_recipe(folder: Path, artifact: Path, extra: str = "", *, steps: int = 12,
                 name: str = "recipe.yaml") -> Path:
    """A small recipe over the bundled corpus: 64-token sequences, 8 per step."""
    text = textwrap.dedent(f"""\
        moecompose_recipe: 1
        artifact: {artifact}
        data:
          code: {{files: ['{CORPUS}/code/*.txt']}}
          legal: {{files: ['{CORPUS}/legal/*.txt']}}
        held_out: 0.15
        sequence_length: 64
        batch_tokens: 512
        steps: {steps}
        optimizer: {{lr: 3e-3}}
        schedule: {{warmup_steps: 2}}
        eval: {{max_tokens: 2048}}
        """)
    extra = textwrap.dedent(extra)
    replaced = {line.split(":")[0] for line in extra.splitlines() if line and line[0] != " "}
    kept, skipping = [], False
    for line in text.splitlines():
        if not line.startswith(" "):
            skipping = line.split(":")[0] in replaced
        if not skipping:
            kept.append(line)
    path = folder / name
    path.write_text("\n".join(kept) + "\n" + extra)
    return path


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    return {name for name in a if not torch.equal(a[name], b[name])}
