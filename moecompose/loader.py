"""Loading an artifact into the model: its config.json read as the native config and its
tensors renamed into native names, both by the artifact's format (``moecompose.formats``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from moecompose import formats
from moecompose.errors import BuildError
from moecompose.model.config import ModelConfig

if TYPE_CHECKING:
    from moecompose.model import MoECausalLM


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
    model_type = config.get("model_type")
    fmt = formats.by_model_type(model_type)
    native = None if fmt is None else fmt.read_config(config)
    if fmt is None or native is None:
        raise BuildError(
            f"{config_path} is not a moecompose artifact (model_type {model_type!r})",
            hint="load Hugging Face models that moecompose did not build with transformers",
        )
    native = dict(native)
    if dtype is not None:
        native["dtype"] = dtype
    files = weight_files(path)
    if not files:
        raise BuildError(f"{path} has no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    native_config = ModelConfig.from_dict(native)
    model = MoECausalLM.from_config(native_config)
    model.load_weights(fmt.read_tensors(native_config, tensors))
    if device is not None:
        model = model.to(device)
    return model.eval()
