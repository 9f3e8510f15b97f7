"""Mean hidden states of a dense source: Nexus domain embeddings and prompt-initialised
routers.

Both are averages of one dense model's hidden states over texts. `Embedder` runs the
source as our own decoder (every layer dense, fp32) with the source's own `tokenizer.json`,
one text at a time, so no padding enters any average, and one layer at a time, so only
one layer's weights are in memory:

* `Embedder.text_embedding`: the final hidden states (after the final RMSNorm, what
  Hugging Face calls `last_hidden_state`), mean over each text's tokens, then over texts.
* `Embedder.layer_inputs`: the residual stream entering decoder layer `i` (Hugging Face's
  `hidden_states[i]` with `output_hidden_states=True`), averaged the same way.
* `prompt_router_rows`: router row `e` of layer `i` is the layer input averaged over
  expert `e`'s prompts, minus the same average over its negative prompts, L2-normalised.

`EmbeddingCache` keeps computed tensors on disk under a key made of everything they were
computed from, so a rebuild loads no model::

    key = cache.key(what="domain", source=weights_fingerprint(path),
                    texts=files_fingerprint(files), max_tokens=512)
    vector = cache.get_or_compute(key, lambda: Embedder.load(name, path).file_embedding(files, 512))

Stored vectors (`.safetensors`, `.npy`) are read by `moecompose.sources.vectors`;
`read_embedding_file` is its build-stage entry, failing with a `SourceError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moecompose.errors import BuildError, MoeComposeError, SourceError
from moecompose.formats.native import model_config
from moecompose.model.causal_lm import DecoderLayer
from moecompose.model.config import DenseFFNConfig, LayerConfig, ModelConfig
from moecompose.model.parts import RMSNorm, RotaryEmbedding, TokenEmbedding, sequence_mask
from moecompose.sources.checkpoint import Checkpoint, open_checkpoint
from moecompose.sources.safetensors_io import SafetensorsWriter, read_header, read_tensor
from moecompose.sources.vectors import VectorFileError, read_embedding
from moecompose.text import ranges

CACHE_ENV = "MOECOMPOSE_CACHE_DIR"
CACHE_FORMAT = 1  # part of every cache key: bump it when what is computed changes
PARALLEL_COS = 0.95  # router rows closer than this (cosine) are reported


@dataclass
class Embedder:
    """A dense source run as our native decoder (every layer dense, fp32) with its tokenizer.

    The forward pass streams: all texts go through one decoder layer at a time, and only
    that layer's weights are in memory (read when it runs, dropped after), plus the token
    embeddings and the texts' hidden states. A source of any size embeds in the memory of
    one layer. `tokenizer` is a `tokenizers.Tokenizer`; texts are encoded with its own
    post-processor, so special tokens are added as the source's tokenizer adds them.
    """

    name: str
    path: Path
    checkpoint: Checkpoint
    config: ModelConfig
    tokenizer: Any
    device: torch.device

    @classmethod
    def load(cls, name: str, path: Path, device: str | torch.device = "cpu") -> Embedder:
        """Read source `name`'s metadata and tokenizer at `path`; weights are read per layer
        when texts are embedded."""
        ckpt = open_checkpoint(name, path)
        where = f"source '{name}' ({path})"
        tokenizer = _load_tokenizer(where, path)
        dense = [LayerConfig(ffn=DenseFFNConfig())] * ckpt.arch.num_hidden_layers
        config = model_config(ckpt.arch, ckpt.family.name, dense, where=where)
        return cls(name, path, ckpt, config, tokenizer, torch.device(device))

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def text_embedding(
        self, docs: Sequence[str], max_tokens: int, names: Sequence[str] | None = None
    ) -> Tensor:
        """[d] fp32: final hidden states, mean over each doc's tokens, then over docs.

        Each doc is truncated to `min(max_tokens, max_position_embeddings)` tokens (special
        tokens kept, as Hugging Face's `truncation=True` keeps them). `names` (one per doc)
        name the docs in error messages.
        """
        return self._mean_states(docs, [self.num_layers], max_tokens, names)[self.num_layers]

    def file_embedding(self, files: Sequence[Path], max_tokens: int) -> Tensor:
        """`text_embedding` of text files, one document per file (see `read_texts`)."""
        return self.text_embedding(read_texts(files), max_tokens, [str(f) for f in files])

    def layer_inputs(
        self,
        prompts: Sequence[str],
        layers: Sequence[int],
        max_tokens: int,
        names: Sequence[str] | None = None,
    ) -> dict[int, Tensor]:
        """{i: [d] fp32}: the input of decoder layer `i`, mean over each prompt's tokens,
        then over prompts. Truncation and `names` as in `text_embedding`."""
        for i in layers:
            if not 0 <= i < self.num_layers:
                raise BuildError(
                    f"source '{self.name}' has no decoder layer {i}",
                    hint=f"layers are 0 to {self.num_layers - 1}",
                )
        return self._mean_states(prompts, layers, max_tokens, names)

    def _tokens(self, texts: Sequence[str], max_tokens: int, names: Sequence[str] | None
                ) -> list[list[int]]:
        if not texts:
            raise BuildError(f"no texts to embed with source '{self.name}'")
        if max_tokens < 1:
            raise BuildError(f"max_tokens must be at least 1, got {max_tokens}")
        names = list(names) if names is not None else [f"text {k + 1}" for k in range(len(texts))]
        limit = min(max_tokens, self.config.max_position_embeddings)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(limit)
        out = []
        for text, name in zip(texts, names, strict=True):
            # tokenizers cannot truncate below its special tokens: the slice makes sure
            ids = self.tokenizer.encode(text).ids[:limit]
            if not ids:
                raise SourceError(
                    f"{name} tokenises to zero tokens with the tokenizer of source '{self.name}'",
                    hint="give it text, or leave it out",
                )
            out.append(ids)
        return out

    def _weights(self, module: nn.Module, prefix: str) -> nn.Module:
        """`module` with the source's tensors named `prefix + its state_dict names` (fp32)."""
        state = {}
        for key in module.state_dict():
            entry = self.checkpoint.tensors.get(prefix + key)
            if entry is None:
                raise SourceError(f"source '{self.name}' lacks tensor '{prefix + key}'",
                                  hint="the checkpoint is incomplete")
            state[key] = read_tensor(entry).to(torch.float32)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise SourceError(
                f"source '{self.name}': its tensors do not match its config.json: {exc}",
                hint="the checkpoint is inconsistent; re-save it with transformers",
            ) from None
        return module.to(self.device).eval()

    def _mean_states(
        self,
        texts: Sequence[str],
        indices: Sequence[int],
        max_tokens: int,
        names: Sequence[str] | None,
    ) -> dict[int, Tensor]:
        """{i: [d] fp32} in Hugging Face's `hidden_states` indexing (`i < L`: the input of
        layer `i`; `i == L`: the final normed output), mean over tokens, then over texts."""
        tokens = self._tokens(texts, max_tokens, names)
        with torch.inference_mode():
            means = self._forward(tokens, set(indices))
        # inference tensors cannot enter autograd: return ordinary copies
        return {i: means[i].clone().float().cpu() for i in sorted(means)}

    def _forward(self, tokens: list[list[int]], wanted: set[int]) -> dict[int, Tensor]:
        cfg = self.config
        embed = self._weights(TokenEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.scale_embeddings),
                              "model.embed_tokens.")
        states = [embed(torch.tensor(ids, device=self.device)) for ids in tokens]  # [S, d] each
        del embed
        longest = torch.arange(max(len(ids) for ids in tokens), device=self.device)
        ropes = {False: RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)}
        if cfg.rope_local_base_freq is not None:  # sliding-window layers' own (Gemma 3)
            ropes[True] = RotaryEmbedding(cfg.head_dim, cfg.rope_local_base_freq)
        tables = {local: rope.to(self.device)(longest, torch.float32)  # cos, sin [S, dh]
                  for local, rope in ropes.items()}

        def positional(i: int, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
            """Rotary tables and mask (None: plain causal) of layer i for a text of n tokens."""
            cos, sin = tables[cfg.local_rope(i)]
            return cos[:n], sin[:n], sequence_mask(n, self.device, cfg.layer_window(i))

        means: dict[int, Tensor] = {}
        for i, spec in enumerate(cfg.layers):
            if i in wanted:
                means[i] = _mean_of_means(states)
            layer = self._weights(DecoderLayer(cfg, spec, "grouped"), f"model.layers.{i}.")
            states = [layer(x[None], *positional(i, len(x)))[0][0] for x in states]
            del layer  # one layer's weights in memory at a time
        if cfg.num_hidden_layers in wanted:
            norm = self._weights(RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset),
                                 "model.norm.")
            means[cfg.num_hidden_layers] = _mean_of_means([norm(x) for x in states])
        return means


def _mean_of_means(states: list[Tensor]) -> Tensor:
    """Mean over each text's tokens ([S, d] -> [d]), then over texts (each weighs the same)."""
    return torch.stack([x.mean(dim=0) for x in states]).mean(dim=0)


def _load_tokenizer(where: str, path: Path) -> Any:
    file = path / "tokenizer.json"
    if not file.is_file():
        raise SourceError(
            f"{where} has no tokenizer.json: embedding texts needs the source's tokenizer",
            hint="save the model's fast tokenizer into its folder, or embed with another source",
        )
    from tokenizers import Tokenizer  # a dependency, imported only when texts are embedded

    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exceptions for bad files
        raise SourceError(
            f"{where}: cannot read tokenizer.json: {exc}",
            hint="the file is corrupted; re-save the tokenizer with transformers",
        ) from None


def read_texts(files: Sequence[Path]) -> list[str]:
    """The content of each UTF-8 text file; an unreadable or empty one is a `SourceError`."""
    texts = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SourceError(
                f"cannot read text file {path}: {exc.strerror or exc}",
                hint="check that it exists and is readable",
            ) from None
        except UnicodeDecodeError:
            raise SourceError(
                f"text file {path} is not UTF-8 text",
                hint="convert it to UTF-8, or leave it out of the domain's texts",
            ) from None
        if not text.strip():
            raise SourceError(
                f"text file {path} is empty", hint="fill it, or leave it out of the domain's texts"
            )
        texts.append(text)
    return texts


def prompt_router_rows(
    embedder: Embedder,
    prompts: Mapping[str, Sequence[str]],
    negative: Mapping[str, Sequence[str]] | None,
    layers: Sequence[int],
    max_tokens: int,
) -> dict[int, Tensor]:
    """{i: [E, d] fp32}: row `e` (experts in the order of `prompts`) is the mean input of
    layer `i` over `prompts[e]`, minus that over `negative[e]` when given, L2-normalised."""
    negative = negative or {}
    unknown = [e for e in negative if e not in prompts]
    if unknown:
        raise BuildError(
            f"negative prompts name expert '{unknown[0]}', which has no prompts",
            hint=f"experts with prompts: {', '.join(prompts)}",
        )
    rows: dict[int, list[Tensor]] = {i: [] for i in layers}
    for expert, texts in prompts.items():
        if not texts:
            raise BuildError(f"expert '{expert}' has no prompts", hint="give it at least one")
        names = [f"prompt {k + 1} of expert '{expert}'" for k in range(len(texts))]
        mean = embedder.layer_inputs(texts, layers, max_tokens, names)
        against = negative.get(expert)
        if against:
            names = [f"negative prompt {k + 1} of expert '{expert}'" for k in range(len(against))]
            other = embedder.layer_inputs(against, layers, max_tokens, names)
            for i in layers:
                row = mean[i] - other[i]
                if row.norm() <= 1e-6 * mean[i].norm():
                    raise BuildError(
                        f"the prompts and negative prompts of expert '{expert}' give the same "
                        f"mean state at layer {i}",
                        hint="make the negative prompts differ from the prompts",
                    )
                mean[i] = row
        for i in layers:
            rows[i].append(mean[i])
    return {i: F.normalize(torch.stack(rows[i]), dim=-1) for i in layers}


def nearly_parallel_rows(
    rows: Mapping[int, Tensor], experts: Sequence[str], threshold: float = PARALLEL_COS
) -> list[str]:
    """One warning per pair of experts whose router rows (`{i: [E, d]}`) have cosine
    similarity above `threshold` at some layer."""
    layers = sorted(rows)
    if not layers:
        return []
    cos = torch.stack([F.normalize(rows[i].float(), dim=-1) for i in layers])  # [L, E, d]
    cos = cos @ cos.transpose(1, 2)  # [L, E, E]
    out = []
    for a in range(len(experts)):
        for b in range(a + 1, len(experts)):
            pair = cos[:, a, b]  # [L]
            close = tuple(layers[n] for n in range(len(layers)) if pair[n] > threshold)
            if close:
                where = f"layer{'s' if len(close) > 1 else ''} {ranges(close)}"
                out.append(
                    f"rows for experts '{experts[a]}' and '{experts[b]}' are nearly parallel at "
                    f"{where} (cos {pair.max().item():.2f}): give more distinctive prompts"
                )
    return out


def read_embedding_file(path: Path, key: str | None = None) -> Tensor:
    """A stored domain vector as [m] fp32 (`moecompose.sources.vectors.read_embedding`);
    any problem with the file is a `SourceError` naming it."""
    try:
        vector = read_embedding(path, key)
    except VectorFileError as exc:
        raise SourceError(str(exc), hint=exc.hint) from None
    except MoeComposeError:
        raise
    except Exception:  # a header too broken for the reader's own checks
        raise SourceError(f"{path} is corrupt", hint="write the vector again") from None
    if not torch.isfinite(vector).all():
        raise SourceError(f"{path} holds NaN or infinite values", hint="write the vector again")
    return vector


def weights_fingerprint(path: Path) -> str:
    """A cheap key for everything an `Embedder` reads from a source folder: the name, size
    and mtime_ns of each `*.safetensors` file, and the content of `config.json` and
    `tokenizer.json` (the tokenizer changes embeddings as much as the weights do). Weights
    are not hashed: re-saving a file changes its mtime."""
    digest = hashlib.sha256()
    try:
        for file in sorted(path.glob("*.safetensors")):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        for name in ("config.json", "tokenizer.json"):
            if (path / name).is_file():
                content = hashlib.sha256((path / name).read_bytes()).hexdigest()
                digest.update(f"{name}:{content}\n".encode())
    except OSError as exc:
        raise SourceError(f"cannot read source folder {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """`$MOECOMPOSE_CACHE_DIR`, else `$XDG_CACHE_HOME/moecompose/embeddings`, else
    `~/.cache/moecompose/embeddings`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moecompose" / "embeddings"


class EmbeddingCache:
    """Content-addressed tensors on disk: one `<key>.safetensors` file per key under
    `root` (default: `default_cache_dir()`).

    Writes are atomic (a temporary file renamed into place). An entry that cannot be read
    back (truncated, corrupt, another key's) is a miss, and the next `put` replaces it. A
    cache that cannot be written only warns: it saves time, it is never needed.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def key(self, **parts: Any) -> str:
        """sha256 of the canonical JSON of `parts` (sorted keys; paths as strings)."""
        data = json.dumps(
            {"cache_format": CACHE_FORMAT, **parts},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(data.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> Tensor | None:
        """The stored fp32 tensor, or None when absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entries, metadata = read_header(path)
            if metadata.get("key") != key or set(entries) != {"value"}:
                return None
            value = read_tensor(entries["value"])
        except (SourceError, OSError, RuntimeError, KeyError, ValueError):
            return None
        if value.dtype != torch.float32 or not torch.isfinite(value).all():
            return None
        return value

    def put(self, key: str, tensor: Tensor) -> None:
        """Store `tensor` (as fp32) under `key`, replacing what was there."""
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        tmp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            tmp = Path(name)
            writer = SafetensorsWriter(tmp, [("value", "F32", tuple(value.shape))], {"key": key})
            try:
                writer.write("value", value)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            os.replace(tmp, self.path(key))
        except BaseException as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            warnings.warn(
                f"cannot write the embedding cache in {self.root}: {exc.strerror or exc} "
                f"(set {CACHE_ENV} to a writable folder)",
                stacklevel=2,
            )

    def get_or_compute(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """The cached tensor for `key`, or `compute()`, stored under `key`."""
        value = self.get(key)
        if value is None:
            value = compute().detach().to("cpu", torch.float32)
            self.put(key, value)
        return value
