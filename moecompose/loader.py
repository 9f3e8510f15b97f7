"""Loading an artifact into the model: its config.json read as the native config and its
tensors renamed into native names, both by the artifact's format (``moecompose.formats``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moecompose import formats
from moecompose.artifact import read_json
from moecompose.dtypes import ITEMSIZE, torch_dtype
from moecompose.errors import BuildError
from moecompose.formats import Format
from moecompose.formats.native import native_names, stored_names
from moecompose.model.config import ModelConfig
from moecompose.sources.safetensors_io import TensorEntry, pread_exact, read_header, tensor_bytes

if TYPE_CHECKING:
    from moecompose.model import MoECausalLM


def weight_files(path: Path) -> list[Path]:
    """The model's safetensors files: the index's shards, else ``model.safetensors`` (an
    artifact also holds other safetensors files, such as its domain embeddings)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(path, index.name).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name and Path(name).name == name
            for name in weight_map.values()
        ):
            raise BuildError(f"{index} is corrupted: no valid 'weight_map'",
                             hint="rebuild the artifact, or restore the file")
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"`` (the configs' spelling)."""
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


CHUNK = 16 * 2**20
"""Bytes read at a time into a scratch buffer when a tensor is cast or moved as it is read."""


def read_weights(
    files: list[Path],
    stored: Mapping[str, str | tuple[str, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The tensors of ``files`` in native names: floating-point ones in ``dtype``, all on
    ``device``. ``stored`` says how the artifact's format stores a native tensor under
    another name, or as per-expert tensors to stack (``formats.native.stored_names``); a
    tensor it does not list keeps its name. A native tensor whose stored parts are not all
    there is left out (so the model's check names it as missing).

    Every native tensor is allocated once, in its final dtype and place, and each stored
    tensor's bytes are read with ``pread`` straight into it (into its slice of a stacked
    tensor), in file order; a tensor that is cast or moved on the way goes through a
    scratch buffer of ``CHUNK`` bytes. So loading costs one read of the files, and memory
    the model's bytes; no mapping of the files stays behind."""
    entries: dict[str, TensorEntry] = {}
    for file in files:
        entries.update(read_header(file)[0])
    parts = {native: names if isinstance(names, tuple) else (names,)
             for native, names in stored.items()}
    taken = {name for names in parts.values() for name in names}
    parts.update({name: (name,) for name in entries if name not in taken})
    tensors: dict[str, torch.Tensor] = {}
    slots: list[tuple[TensorEntry, torch.Tensor]] = []
    for native, names in parts.items():
        if not all(name in entries for name in names):
            continue
        found = [entries[name] for name in names]
        first = found[0]
        if any(e.shape != first.shape or e.dtype != first.dtype for e in found):
            raise BuildError(f"the tensors stacked into {native} differ in shape or dtype: "
                             + ", ".join(names))
        own = torch_dtype(first.dtype)
        stacked = isinstance(stored.get(native), tuple)
        shape = (len(found), *first.shape) if stacked else first.shape
        out = torch.empty(shape, dtype=dtype if own.is_floating_point else own, device=device)
        tensors[native] = out
        slots.extend((entry, out[k] if stacked else out) for k, entry in enumerate(found))
    handles: dict[str, int] = {}
    try:
        for entry, dest in sorted(slots, key=lambda slot: (slot[0].file, slot[0].start)):
            if entry.file not in handles:
                handles[entry.file] = os.open(entry.file, os.O_RDONLY)
            _read_into(handles[entry.file], entry, dest)
    finally:
        for fd in handles.values():
            os.close(fd)
    return tensors


def _read_into(fd: int, entry: TensorEntry, dest: torch.Tensor) -> None:
    """The bytes of ``entry`` into the contiguous ``dest`` of its shape: directly when it is a
    CPU tensor of the stored dtype, else ``CHUNK`` bytes at a time, cast and moved."""
    own = torch_dtype(entry.dtype)
    if dest.device.type == "cpu" and dest.dtype == own:
        pread_exact(fd, tensor_bytes(dest), entry.start, entry.file)
        return
    flat = dest.view(-1)
    step = max(CHUNK // ITEMSIZE[entry.dtype], 1)
    scratch = torch.empty(min(step, flat.numel()), dtype=own)
    for a in range(0, flat.numel(), step):
        part = scratch[: min(step, flat.numel() - a)]
        pread_exact(fd, tensor_bytes(part), entry.start + a * ITEMSIZE[entry.dtype], entry.file)
        flat[a : a + part.numel()].copy_(part)


def load_artifact(
    path: Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> MoECausalLM:
    """The artifact at ``path`` as a ``MoECausalLM`` in eval mode, its weights cast to
    ``dtype`` (the artifact's by default) and on ``device`` (CPU by default).

    No random initialisation runs: the module is made on the meta device and the tensors
    read from the files become its parameters (``MoECausalLM.from_weights``), so loading
    costs about one read of the files and the model's bytes of memory."""
    from moecompose.model import MoECausalLM

    fmt, native_config = artifact_config(path, dtype)
    files = weight_files(path)
    if not files:
        raise BuildError(f"{path} has no safetensors weights")
    target = torch.device("cpu" if device is None else device)
    stored = stored_names(fmt.layout, native_config.layers)
    tensors = read_weights(files, stored, torch_dtype(native_config.dtype), target)
    return MoECausalLM.from_weights(native_config, tensors, device=target).eval()


def artifact_config(path: Path, dtype: str | torch.dtype | None = None) -> tuple[Format, ModelConfig]:
    """An artifact's format and native config (``dtype``: the artifact's by default), and
    its trainable set in native names; reads no weights."""
    config_path = path / "config.json"
    config = read_json(path, config_path.name)
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
        native["dtype"] = dtype_name(dtype)
    try:
        native_config = ModelConfig.from_dict(native)
    except ValueError as exc:
        raise BuildError(f"{config_path}: {exc}", hint="rebuild the artifact, or restore the file"
                         ) from None
    if native_config.trainable is not None:  # exports built before it listed native names
        trainable = native_names(fmt.layout, native_config.layers, native_config.trainable)
        native_config = native_config.model_copy(update={"trainable": trainable})
    return fmt, native_config
