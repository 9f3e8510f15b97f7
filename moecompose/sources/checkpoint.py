"""A dense source checkpoint, read as metadata only: config facts, tensor headers,
tokenizer file hashes. No weight is loaded here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecompose.errors import SourceError
from moecompose.sources.families import FAMILIES, Family, family_for
from moecompose.sources.safetensors_io import DTYPE_NAMES, TensorEntry, read_header

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class ArchFacts:
    """What a checkpoint's config says about its shape, in one normalised form."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    initializer_range: float
    bos_token_id: Any
    eos_token_id: Any
    pad_token_id: Any

    # Facts that must agree between sources for their tensors to be combined.
    COMPATIBILITY = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
        "sliding_window",
    )


@dataclass(frozen=True)
class Checkpoint:
    """A source: its folder, family, facts, tensors (by name) and tokenizer hashes."""

    name: str
    path: Path
    family: Family
    arch: ArchFacts
    tensors: dict[str, TensorEntry]
    tokenizer: dict[str, str]
    fingerprint: str

    @property
    def dtype(self) -> str:
        """The dtype of the floating-point tensors (the most common one)."""
        counts: dict[str, int] = {}
        for entry in self.tensors.values():
            counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.numel
        code = max(counts, key=lambda c: counts[c]) if counts else "F32"
        return DTYPE_NAMES.get(code, code)


def open_checkpoint(name: str, path: Path) -> Checkpoint:
    """Read a Hugging Face model folder's metadata; every problem is a ``SourceError``."""
    where = f"source '{name}' ({path})"
    if not path.exists():
        raise SourceError(f"{where} does not exist", hint="check the path in 'sources'")
    if not path.is_dir():
        raise SourceError(f"{where} is not a folder", hint="point to a Hugging Face model folder")
    config = _read_json(path / "config.json", where)
    model_type = str(config.get("model_type", ""))
    family = family_for(model_type)
    if family is None:
        known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
        raise SourceError(
            f"{where} has model_type '{model_type}', which moecompose cannot read",
            hint=f"supported: {known}",
        )
    try:
        arch = _arch_facts(config, family, where)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise SourceError(
            f"{where}: config.json has an invalid value: {exc}",
            hint="fix config.json or re-save the checkpoint with transformers",
        ) from None
    tensors = _tensor_index(path, where)
    try:
        tokenizer = {
            f: hashlib.sha256((path / f).read_bytes()).hexdigest()
            for f in TOKENIZER_FILES
            if (path / f).is_file()
        }
    except OSError as exc:
        raise SourceError(f"{where}: cannot read tokenizer file: {exc.strerror or exc}") from None
    fingerprint = tensors_fingerprint(tensors, json.dumps(config, sort_keys=True))
    return Checkpoint(name, path, family, arch, tensors, tokenizer, fingerprint)


def tensors_fingerprint(tensors: dict[str, TensorEntry], prefix: str = "") -> str:
    """A cheap identity of a folder's weights: every tensor's name, dtype, shape and size."""
    digest = hashlib.sha256(prefix.encode())
    for tensor_name in sorted(tensors):
        e = tensors[tensor_name]
        digest.update(f"{tensor_name}:{e.dtype}:{e.shape}:{e.end - e.start}".encode())
    return digest.hexdigest()


def open_tensors(name: str, path: Path) -> dict[str, TensorEntry]:
    """The tensors of a folder of safetensors weights (a built artifact), by name."""
    return _tensor_index(path, f"{name} ({path})")


def _read_json(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise SourceError(f"{where} has no {path.name}", hint="is this a Hugging Face model folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SourceError(f"{where}: cannot read {path.name}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"{where}: {path.name} is not valid JSON: {exc}",
            hint="the file is corrupted; re-download or re-save the checkpoint",
        ) from None
    if not isinstance(data, dict):
        raise SourceError(
            f"{where}: {path.name} must hold a JSON object",
            hint="the file is corrupted; re-download or re-save the checkpoint",
        )
    return data


def _arch_facts(config: dict[str, Any], family: Family, where: str) -> ArchFacts:
    def need(key: str) -> Any:
        if key not in config:
            raise SourceError(
                f"{where}: config.json lacks '{key}'",
                hint="is this a complete Hugging Face config?",
            )
        return config[key]

    for key, off in family.must_be.items():
        if config.get(key, off) != off:
            raise SourceError(
                f"{where}: {key}={config[key]!r} is not supported",
                hint=f"only checkpoints with {key}={off!r} can be read",
            )
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    rope = dict(config.get("rope_parameters") or {})
    rope_theta = float(config.get("rope_theta", rope.pop("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    scaling = config.get("rope_scaling") or (rope if rope else None)
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise SourceError(
                f"{where}: rope type '{kind}' is not supported", hint="supported: default, linear, llama3"
            )
        else:
            scaling["rope_type"] = kind
            scaling.pop("type", None)
    act = str(config.get("hidden_act", "silu"))
    if act != "silu":
        raise SourceError(f"{where}: hidden_act '{act}' is not supported (only silu / SwiGLU)")
    if family.qkv_bias_key is None:
        bias = family.qkv_bias_default
    else:
        bias = bool(config.get(family.qkv_bias_key, family.qkv_bias_default))
    window = config.get("sliding_window")
    max_positions = int(config.get("max_position_embeddings", 2048))
    if family.name == "qwen2":
        if config.get("use_sliding_window", False) and window:
            raise SourceError(
                f"{where}: Qwen2 sliding-window attention (use_sliding_window: true) is not "
                "supported: Qwen2 applies the window only to layers from max_window_layers on",
                hint="set use_sliding_window to false if the model was trained without it",
            )
        window = None
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise SourceError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    if window is not None and window >= max_positions:
        window = None  # a window as long as the context changes nothing
    return ArchFacts(
        model_type=str(config["model_type"]),
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        hidden_act=act,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bias,
        sliding_window=window,
        initializer_range=float(config.get("initializer_range", 0.02)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )


def _tensor_index(path: Path, where: str) -> dict[str, TensorEntry]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, where).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SourceError(
                f"{where}: {index.name} has no 'weight_map'",
                hint="the index is corrupted; re-download or re-save the checkpoint",
            )
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        files, weight_map = sorted(p.name for p in path.glob("*.safetensors")), None
        if not files:
            hint = (
                "convert it with transformers: model.save_pretrained(path, safe_serialization=True)"
                if any(path.glob("*.bin"))
                else "a model folder needs *.safetensors weights"
            )
            raise SourceError(f"{where} has no safetensors weights", hint=hint)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        if not (path / file).is_file():
            raise SourceError(
                f"{where}: shard '{file}' named in the index is missing",
                hint="the download is incomplete; fetch the missing shard",
            )
        entries, _ = read_header(path / file)
        for tensor_name, entry in entries.items():
            if weight_map is not None and weight_map.get(tensor_name) != file:
                continue
            tensors[tensor_name] = entry
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SourceError(
                f"{where}: tensor '{missing[0]}' is in the index but not in its shard",
                hint="the checkpoint is corrupted; re-download or re-save it",
            )
    return tensors
