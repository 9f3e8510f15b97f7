"""Reading artifacts back: native ones as they are, Hugging Face exports (Mixtral,
Qwen2-MoE) by mapping their tensor names onto the native layout with the same tables
the planner wrote them with (``moecompose.plan.layouts``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from moecompose.errors import BuildError
from moecompose.plan.layouts import LAYOUTS

if TYPE_CHECKING:
    from moecompose.model import MoECausalLM


def native_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The native config of an artifact's config.json (exported ones embed it)."""
    model_type = config.get("model_type")
    if model_type == "moecompose":
        return config
    if model_type in ("mixtral", "qwen2_moe") and isinstance(config.get("moecompose"), dict):
        return config["moecompose"]
    raise BuildError(
        f"{where / 'config.json'} is not a moecompose artifact (model_type {model_type!r})",
        hint="load Hugging Face models that moecompose did not build with transformers",
    )


def to_native(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and stack) an exported artifact's tensors into native names."""
    fmt = config.get("model_type")
    if fmt == "moecompose":
        return tensors
    layout, native = LAYOUTS[str(fmt)], LAYOUTS["native"]
    out = dict(tensors)
    for i, layer in enumerate(config["moecompose"]["layers"]):
        ffn = layer["ffn"]
        if ffn["kind"] != "moe":
            continue
        out[native.router.format(i=i)] = out.pop(layout.router.format(i=i))
        for proj, name in layout.expert.items():
            parts = [out.pop(name.format(i=i, j=j)) for j in range(ffn["num_experts"])]
            out[native.expert[proj].format(i=i)] = torch.stack(parts)
        if ffn.get("shared_expert"):
            for proj, name in layout.shared.items():
                out[native.shared[proj].format(i=i)] = out.pop(name.format(i=i))
            if layout.shared_expert_gate is not None:
                out[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = out.pop(
                    layout.shared_expert_gate.format(i=i)
                )
    return out


def weight_files(path: Path) -> list[Path]:
    """The model's safetensors files: the index's shards, else ``model.safetensors`` (an
    artifact also holds other safetensors files, such as its domain embeddings)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text()).get("weight_map", {}).values()
        return [path / name for name in sorted(set(shards))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def load_artifact(path: Path, *, dtype: str | None = None, device: str | None = None) -> MoECausalLM:
    from moecompose.model import MoECausalLM

    config_path = path / "config.json"
    if not config_path.is_file():
        raise BuildError(f"{path} has no config.json", hint="is this a moecompose artifact?")
    config = json.loads(config_path.read_text())
    native = dict(native_config(config, path))
    if dtype is not None:
        native["dtype"] = dtype
    files = weight_files(path)
    if not files:
        raise BuildError(f"{path} has no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    model = MoECausalLM.from_config(native)
    model.load_weights(to_native(config, tensors))
    if device is not None:
        model = model.to(device)
    return model.eval()
