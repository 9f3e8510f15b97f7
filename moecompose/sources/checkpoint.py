"""A dense source checkpoint, read as metadata only: config facts, tensor headers,
tokenizer file hashes. No weight is loaded here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecompose.dtypes import NAMES
from moecompose.errors import SourceError
from moecompose.files import FileKindError, file_problem, read_json_file
from moecompose.sources.families import (
    FAMILIES,
    OUT_NORM_ROLES,
    QK_NORM_ROLES,
    Family,
    family_for,
)
from moecompose.sources.safetensors_io import TensorEntry, read_header

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

# Gate activations of the FFN, by the name a Hugging Face config gives them -> ours.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")
LOCAL_ROPE_THETA = 10000.0  # transformers' default base of Gemma 3's sliding-window layers


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
    hidden_act: str  # the FFN's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: str | None  # "head", "full" (see Family.qk_norm) or None
    norm_placement: str  # "pre", "post" or "sandwich" (see Family.norm_placement)
    sliding_window: int | None
    initializer_range: float
    bos_token_id: Any
    eos_token_id: Any
    pad_token_id: Any
    # Gemma's additions (see Family and ModelConfig); the defaults are Llama's.
    norm_unit_offset: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power, not head_dim's
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] | None = None  # None: `sliding_window` in every layer
    rope_local_base_freq: float | None = None  # rope base of "sliding_attention" layers

    # Facts that must agree between sources for their tensors to be combined.
    COMPATIBILITY = (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
        "qk_norm", "norm_placement", "sliding_window", "norm_unit_offset", "scale_embeddings",
        "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
        "layer_types", "rope_local_base_freq",
    )

    def has_role(self, role: str) -> bool:
        """Whether checkpoints of these facts hold tensors of ``role`` (q/k/v biases and
        q/k norms exist only in some)."""
        if role.endswith("_bias"):
            return self.attention_bias
        if role in QK_NORM_ROLES:
            return self.qk_norm is not None
        if role in OUT_NORM_ROLES:
            return self.norm_placement == "sandwich"
        return True


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
        return NAMES.get(code, code)


def open_checkpoint(name: str, path: Path) -> Checkpoint:
    """Read a Hugging Face model folder's metadata; every problem is a ``SourceError``."""
    where = f"source '{name}' ({path})"
    if not path.is_dir():
        problem = file_problem(path)
        if problem == "does not exist":
            raise SourceError(f"{where} does not exist", hint="check the path in 'sources'")
        raise SourceError(
            f"{where} {'is not a folder' if problem is None else problem}",
            hint="point to a Hugging Face model folder",
        )
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
    tensors = _split_fused(_tensor_index(path, where), family, arch, where)
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


def _split_fused(tensors: dict[str, TensorEntry], family: Family, arch: ArchFacts,
                 where: str) -> dict[str, TensorEntry]:
    """Each fused tensor of ``family`` (``Family.fused``) replaced by one entry per role:
    its rows, a contiguous byte range of the file (nothing is read)."""
    if not family.fused:
        return tensors
    rows = {"q": arch.num_attention_heads * arch.head_dim,
            "k": arch.num_key_value_heads * arch.head_dim,
            "v": arch.num_key_value_heads * arch.head_dim,
            "ffn_gate": arch.intermediate_size, "ffn_up": arch.intermediate_size}
    out = dict(tensors)
    for i in range(arch.num_hidden_layers):
        for pattern, roles in family.fused.items():
            entry = out.pop(pattern.format(i=i), None)
            if entry is None:
                continue  # the expected-tensor check names what is missing
            expected = sum(rows[r] for r in roles)
            if len(entry.shape) != 2 or entry.shape[0] != expected:
                raise SourceError(
                    f"{where}: tensor '{entry.name}' has shape {list(entry.shape)}; config.json "
                    f"implies [{expected}, {arch.hidden_size}] ({' + '.join(roles)} rows)",
                    hint="check the checkpoint's config.json against its weights")
            row_bytes = (entry.end - entry.start) // entry.shape[0]
            start = entry.start
            for role in roles:
                name = family.tensor(role, i)
                end = start + rows[role] * row_bytes
                out[name] = TensorEntry(entry.file, entry.dtype, (rows[role], entry.shape[1]),
                                        start, end, name)
                start = end
    return out


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
    if not path.exists() and not path.is_symlink():
        raise SourceError(f"{where} has no {path.name}", hint="is this a Hugging Face model folder?")
    try:
        data = read_json_file(path)
    except FileKindError as exc:
        raise SourceError(f"{where}: {path.name} {exc}", hint="replace it with the real file") from None
    except OSError as exc:
        raise SourceError(f"{where}: cannot read {path.name}: {exc.strerror or exc}") from None
    except ValueError as exc:
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


_REQUIRED = object()
MAX_DIM = 2**31 - 1


class _Config:
    """Typed reads of config.json fields: each wrong type or range is a located error that
    names the field and the value found (``"false"``, a string, is not ``false``)."""

    def __init__(self, config: dict[str, Any], where: str) -> None:
        self.config, self.where = config, where

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        """The value, and whether the config gives it (``null`` means not given)."""
        if key not in self.config or self.config[key] is None:
            if default is _REQUIRED:
                raise SourceError(
                    f"{self.where}: config.json lacks '{key}'",
                    hint="is this a complete Hugging Face config?",
                )
            return default, False
        return self.config[key], True

    def _wrong(self, key: str, expected: str, value: Any) -> SourceError:
        found = f"the string {value!r}" if isinstance(value, str) else json.dumps(value)[:60]
        return SourceError(
            f"{self.where}: config.json field '{key}' must be {expected}, got {found}",
            hint="fix config.json or re-save the checkpoint with transformers",
        )

    def int(self, key: str, default: Any = _REQUIRED, *, low: int = 1) -> Any:
        value, given = self._get(key, default)
        if not given:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_DIM:
            raise self._wrong(key, f"a whole number from {low} to {MAX_DIM}", value)
        return value

    def float(self, key: str, default: Any = _REQUIRED, *, positive: bool = True) -> Any:
        value, given = self._get(key, default)
        if not given:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            positive and value <= 0) or value < 0:
            raise self._wrong(key, "a positive number" if positive else "a number >= 0", value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value, _ = self._get(key, default)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def str(self, key: str, default: Any = _REQUIRED) -> str:
        value, _ = self._get(key, default)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value


def _arch_facts(config: dict[str, Any], family: Family, where: str) -> ArchFacts:
    read = _Config(config, where)
    for key, off in family.must_be.items():
        if config.get(key) is not None and config[key] != off:
            raise SourceError(
                f"{where}: {key}={config[key]!r} is not supported",
                hint=f"only checkpoints with {key}={off!r} can be read",
            )
    heads = read.int("num_attention_heads")
    hidden = read.int("hidden_size")
    kv_heads = read.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise SourceError(
            f"{where}: config.json has {heads} attention heads, not a multiple of its "
            f"{kv_heads} key-value heads", hint="fix num_key_value_heads",
        )
    head_dim = read.int("head_dim", 0)
    if not head_dim:
        if hidden % heads:
            raise SourceError(
                f"{where}: config.json hidden_size {hidden} is not a multiple of "
                f"num_attention_heads {heads}", hint="give head_dim explicitly or fix the widths",
            )
        head_dim = hidden // heads
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise read._wrong("rope_parameters", "a mapping", rope)
    rope_field, local_rope = "rope_parameters", None
    if any(t in rope for t in LAYER_TYPES):  # one entry per layer type (Gemma 3)
        rope_field, local_rope = "rope_parameters.full_attention", rope.get("sliding_attention")
        rope = rope.get("full_attention") or {}
        if not isinstance(rope, dict):
            raise read._wrong(rope_field, "a mapping", rope)
    rope = dict(rope)
    rope_theta = read.float("rope_theta", _Config(rope, where).float("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    scaling = config.get("rope_scaling") or (rope if rope else None)
    if config.get("rope_scaling"):
        rope_field = "rope_scaling"
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise read._wrong(rope_field, "a mapping", scaling)
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise SourceError(
                f"{where}: rope type '{kind}' is not supported (config.json field "
                f"'{rope_field}')", hint="supported: default, linear, llama3"
            )
        else:
            scaling["rope_type"] = kind
            scaling.pop("type", None)
            scaling.pop("partial_rotary_factor", None)  # checked below: 1.0 only
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise SourceError(
            f"{where}: partial_rotary_factor {partial!r} is not supported (rotary positions on "
            "every head dimension only)", hint="use a checkpoint with partial_rotary_factor 1.0")
    act = read.str(family.act_key, family.act_default)
    if act not in ACTIVATIONS:
        raise SourceError(
            f"{where}: {family.act_key} '{act}' is not supported",
            hint=f"supported FFN activations: {', '.join(ACTIVATIONS)}")
    if family.qkv_bias_key is None:
        bias = family.qkv_bias_default
    else:
        bias = read.bool(family.qkv_bias_key, family.qkv_bias_default)
    window = config.get("sliding_window")
    max_positions = read.int("max_position_embeddings", 2048)
    if family.window_switch is not None:
        if read.bool(family.window_switch, False) and window:
            raise SourceError(
                f"{where}: {family.name.capitalize()} sliding-window attention ({family.window_switch}: "
                f"true) is not supported: {family.name.capitalize()} applies the window only to layers from "
                "max_window_layers on",
                hint=f"set {family.window_switch} to false if the model was trained without it",
            )
        window = None
    layers = read.int("num_hidden_layers")
    layer_types = _layer_types(read, family, layers)
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise SourceError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    if window is not None and window >= max_positions:
        window = None  # a window as long as the context changes nothing
    local_theta = None
    if family.local_rope_key is not None:
        local_theta = _local_rope_theta(read, family.local_rope_key, local_rope)
    # Layers that all attend alike are read as in a family with one kind of attention.
    if layer_types is not None and "sliding_attention" not in layer_types:
        layer_types, window, local_theta = None, None, None  # full attention everywhere
    elif layer_types is not None and window is None and local_theta is None:
        layer_types = None  # sliding-window layers without a window or a rope of their own
    return ArchFacts(
        model_type=read.str("model_type"),
        vocab_size=read.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=read.int("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=ACTIVATIONS[act],
        rms_norm_eps=read.float("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=read.bool("tie_word_embeddings", family.tie_default),
        attention_bias=bias,
        qk_norm=family.qk_norm,
        norm_placement=family.norm_placement,
        sliding_window=window,
        initializer_range=read.float("initializer_range", 0.02, positive=False),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        norm_unit_offset=family.norm_unit_offset,
        scale_embeddings=family.scale_embeddings,
        query_pre_attn_scalar=read.float("query_pre_attn_scalar", None),
        attn_logit_softcapping=read.float("attn_logit_softcapping", None),
        final_logit_softcapping=read.float("final_logit_softcapping", None),
        layer_types=layer_types,
        rope_local_base_freq=local_theta,
    )


def _layer_types(read: _Config, family: Family, layers: int) -> tuple[str, ...] | None:
    """Each layer's attention kind, for a family whose layers differ (`window_pattern`):
    `layer_types`, or from `sliding_window_pattern` P (layer i is full iff (i + 1) % P == 0)
    as transformers reads older configs. Other families must attend alike in every layer."""
    given = read.config.get("layer_types")
    if family.window_pattern is None:
        if isinstance(given, list) and any(t != "full_attention" for t in given):
            other = next(t for t in given if t != "full_attention")
            raise SourceError(
                f"{read.where}: layer_types holds '{other}' layers: only full attention in every "
                "layer is supported for this family", hint="use a checkpoint whose layer_types "
                "are all 'full_attention'")
        return None
    if given is None:
        pattern = read.int("sliding_window_pattern", family.window_pattern)
        return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(layers))
    if not isinstance(given, list) or any(t not in LAYER_TYPES for t in given):
        raise read._wrong("layer_types", f"a list of {' or '.join(map(repr, LAYER_TYPES))}",
                          given)
    if len(given) != layers:
        raise SourceError(
            f"{read.where}: config.json field 'layer_types' has {len(given)} entries for "
            f"{layers} layers (num_hidden_layers)", hint="give one attention kind per layer")
    return tuple(given)


def _local_rope_theta(read: _Config, key: str, local_rope: Any) -> float:
    """The rope base of sliding-window layers: `rope_parameters.sliding_attention` (whose
    rope must be unscaled) or, in older configs, the field `key`."""
    if local_rope is None:
        return read.float(key, LOCAL_ROPE_THETA)
    field = "rope_parameters.sliding_attention"
    if not isinstance(local_rope, dict):
        raise read._wrong(field, "a mapping", local_rope)
    kind = local_rope.get("rope_type", local_rope.get("type", "default"))
    if kind != "default":
        raise SourceError(
            f"{read.where}: rope type '{kind}' is not supported on sliding-window layers "
            f"(config.json field '{field}')", hint="their rope must be unscaled (default)")
    if local_rope.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise SourceError(
            f"{read.where}: partial_rotary_factor {local_rope['partial_rotary_factor']!r} is not "
            f"supported (config.json field '{field}')",
            hint="use a checkpoint with partial_rotary_factor 1.0")
    return _Config(local_rope, f"{read.where} ({field})").float("rope_theta", LOCAL_ROPE_THETA)


def _shard_names(index: Path, where: str) -> tuple[list[str], dict[str, str]]:
    """The shard files an index names, and its weight map; shards must be plain file
    names in the index's own folder (an index cannot pull tensors from elsewhere)."""
    weight_map = _read_json(index, where).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) for f in weight_map.values()
    ):
        raise SourceError(
            f"{where}: {index.name} has no valid 'weight_map' (tensor name -> shard file)",
            hint="the index is corrupted; re-download or re-save the checkpoint",
        )
    for tensor_name, file in weight_map.items():
        if (not file or file in (".", "..") or "/" in file or "\\" in file or "\0" in file
                or Path(file).is_absolute()):
            raise SourceError(
                f"{where}: {index.name} maps tensor '{tensor_name}' to {file!r}, outside "
                "the model folder",
                hint="an index may only name shard files in its own folder",
            )
    return sorted(set(weight_map.values())), weight_map


def _tensor_index(path: Path, where: str) -> dict[str, TensorEntry]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    weight_map: dict[str, str] | None = None
    if index.exists() or index.is_symlink():
        files, weight_map = _shard_names(index, where)
    elif single.exists() or single.is_symlink():
        files = [single.name]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            hint = (
                "convert it with transformers: model.save_pretrained(path, safe_serialization=True)"
                if any(path.glob("*.bin"))
                else "a model folder needs *.safetensors weights"
            )
            raise SourceError(f"{where} has no safetensors weights", hint=hint)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        problem = file_problem(path / file)
        if problem == "does not exist" and weight_map is not None:
            raise SourceError(
                f"{where}: shard '{file}' named in the index is missing",
                hint="the download is incomplete; fetch the missing shard",
            )
        if problem is not None:
            raise SourceError(
                f"{where}: weights file '{file}' {problem}",
                hint="replace it with the real safetensors file",
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
