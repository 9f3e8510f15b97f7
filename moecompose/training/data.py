"""The data of ``moecompose train`` and ``moecompose eval``: text domains -> tokens ->
deterministic, resumable packed batches.

The stages read top to bottom: ``find_files`` expands a recipe's globs, ``read_documents``
turns one file into documents, ``Corpus.load`` tokenises every domain into one training
and one eval token stream (each document's tokens followed by one EOS), and
``BatchStream`` cuts training batches from those streams by the mixture weights. Every
problem a user can cause is a one-line ``DataError`` naming the file, line, glob or
artifact.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecompose.errors import DataError, Location, did_you_mean, one_of
from moecompose.files import MAX_JSON_BYTES, file_problem, loads_json, read_json_file

MAX_LINE_BYTES = MAX_JSON_BYTES  # a JSONL line longer than this is refused, not read
STATE_FORMAT = 1  # BatchStream.state_dict's layout; bump when it changes
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")  # tried when no file names one
_ENCODE_CHUNK = 512  # documents handed to the tokenizer at once
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class DomainFiles:
    """One data domain of a recipe: its training files, its eval files (empty: a held-out
    fraction of its documents is used), and its mixture weight."""

    name: str
    train: tuple[Path, ...]
    eval: tuple[Path, ...] = ()
    weight: float = 1.0


def find_files(
    patterns: Sequence[str], base_dir: Path, *, where: Location | None = None
) -> tuple[Path, ...]:
    """Expand glob patterns (relative to ``base_dir``; ``**`` recursive; ``~`` and absolute
    patterns allowed) into absolute paths: sorted, de-duplicated, regular files only. A
    pattern matching nothing, or only folders, is a ``DataError`` located at ``where``."""
    base = Path(os.path.abspath(base_dir))
    found: set[Path] = set()
    for pattern in patterns:
        try:
            matches = glob.glob(os.path.expanduser(pattern), root_dir=base, recursive=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot expand the glob '{pattern}' in {base}: {exc}",
                            location=where) from None
        paths = [Path(os.path.normpath(base / m)) for m in matches]
        files = [p for p in paths if file_problem(p) is None]
        if not files:
            what = "only folders" if any(p.is_dir() for p in paths) else "no file"
            raise DataError(
                f"the glob '{pattern}' matches {what} in {base}",
                location=where,
                hint="a relative glob is read from that folder; use ** to recurse, "
                "e.g. 'data/**/*.jsonl'",
            )
        found.update(files)
    return tuple(sorted(found))


class TextTokenizer:
    """An artifact's own tokenizer (tokenizer.json via the ``tokenizers`` package), and its
    EOS id. Truncation and padding saved in the file are switched off: documents are
    encoded whole, without special tokens."""

    def __init__(self, tokenizer: Any, eos_id: int) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.eos_id = eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_artifact(cls, artifact: Path, eos_id: int | None) -> TextTokenizer:
        """Load ``artifact``/tokenizer.json. ``eos_id`` is the artifact's config.json
        ``eos_token_id``; when None, the EOS is the token that tokenizer_config.json (or
        special_tokens_map.json) names as ``eos_token``, else a well-known EOS token
        (``EOS_NAMES``) of the vocabulary."""
        from tokenizers import Tokenizer  # a dependency, imported only when text is read

        file = artifact / "tokenizer.json"
        problem = file_problem(file)
        if problem is not None:
            what = f"tokenizer.json {problem}"
            if problem == "does not exist":
                what = "has no tokenizer.json"
            raise DataError(
                f"{artifact} {what}: reading text needs the model's own tokenizer",
                hint="save the model's fast tokenizer into the artifact folder "
                "with tokenizer.save_pretrained",
            )
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises plain Exceptions for bad files
            raise DataError(f"cannot read {file}: {exc}",
                            hint="the file is corrupted; re-save the tokenizer") from None
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if eos_id is None:
            eos_id = _named_eos(artifact, tokenizer)
        elif isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0:
            raise DataError(
                f"{artifact / 'config.json'}: eos_token_id {eos_id!r} is not a token id",
                hint="set eos_token_id to the end-of-sequence token's id",
            )
        return cls(tokenizer, eos_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _named_eos(artifact: Path, tokenizer: Any) -> int:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = artifact / name
        if not path.exists():
            continue
        try:
            data = read_json_file(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}",
                            hint="the file is corrupted; re-save the tokenizer") from None
        token = data.get("eos_token") if isinstance(data, dict) else None
        if isinstance(token, dict):  # an AddedToken written out: {"content": "</s>", ...}
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    for token in EOS_NAMES:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    raise DataError(
        f"{artifact} names no end-of-sequence token: config.json has no eos_token_id, and "
        "tokenizer_config.json names no eos_token its tokenizer knows",
        hint="set eos_token_id in the artifact's config.json",
    )


def read_documents(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """Documents of one file: a ``.jsonl`` file gives one document per non-empty line (a
    JSON object whose ``text_field`` is a string; a bad line is a ``DataError`` at
    file:line), any other file is one UTF-8 document (not UTF-8: a ``DataError`` at the
    line of the first bad byte). A JSONL line longer than 64 MiB or nested deeper than 64
    levels is refused."""
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"data file {path} {problem}", hint="check the domain's globs")
    try:
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield _text_document(path)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as fh:
        number = 0
        while raw := fh.readline(MAX_LINE_BYTES + 2):
            number += 1
            at = Location(str(path), number)
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                raise DataError(f"line is longer than {MAX_LINE_BYTES // 2**20} MiB", location=at,
                                hint="split the document over several lines")
            if not raw.strip():
                continue
            yield _jsonl_text(raw, text_field, at)


def _jsonl_text(raw: bytes, text_field: str, at: Location) -> str:
    hint = f'each line must be one JSON object, like {{"{text_field}": "..."}}'
    try:
        data = loads_json(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"line is not valid JSON: {exc.msg}",
                        location=Location(at.file, at.line, exc.colno), hint=hint) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"line is not UTF-8 text (byte 0x{raw[exc.start]:02x})", location=at,
                        hint="convert the file to UTF-8") from None
    except ValueError as exc:  # too deep, a huge integer, NaN
        raise DataError(f"line is not acceptable JSON: {exc}", location=at, hint=hint) from None
    if not isinstance(data, dict):
        raise DataError(f"line is a JSON {_json_type(data)}, not an object", location=at, hint=hint)
    if text_field not in data:
        keys = list(data)
        hint = did_you_mean(text_field, keys) or (
            f"its fields are {one_of(keys[:8])}" if keys else "the object is empty")
        raise DataError(f"line has no '{text_field}' field", location=at, hint=hint)
    text = data[text_field]
    if not isinstance(text, str):
        raise DataError(f"'{text_field}' is a JSON {_json_type(text)}, not a string",
                        location=at, hint="the document's text must be a JSON string")
    return text


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number" if isinstance(value, (int, float)) else "string"


def _text_document(path: Path) -> str:
    raw = path.read_bytes()
    start = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = start + exc.start
        line = raw.count(b"\n", 0, bad) + 1
        raise DataError(
            f"file is not UTF-8 text (byte 0x{raw[bad]:02x})",
            location=Location(str(path), line),
            hint="convert it to UTF-8, e.g. with iconv",
        ) from None


@dataclass
class Corpus:
    """Tokenised domains: per domain, a training token stream and an eval token stream
    (1-D int64 tensors; each document's tokens followed by one EOS, documents
    concatenated). ``fingerprints`` identify each domain's files by base name and content
    (a moved corpus keeps them); ``documents`` counts (train, eval) non-empty documents,
    a single document split by tokens counting on both sides."""

    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    fingerprints: dict[str, str]
    documents: dict[str, tuple[int, int]]

    @classmethod
    def load(
        cls,
        domains: Sequence[DomainFiles],
        tokenizer: TextTokenizer,
        *,
        held_out: float,
        seed: int,
        text_field: str = "text",
    ) -> Corpus:
        """Read and tokenise every domain. A domain without eval files holds out a
        ``held_out`` fraction of its documents, chosen by a hash of (seed, file base name,
        document index) and moved so that each side keeps at least one document; a domain
        of a single document holds out the last ``held_out`` fraction of its tokens."""
        if isinstance(held_out, bool) or not 0.0 <= held_out < 1.0:
            raise DataError(f"held_out is {held_out!r}; it must be at least 0 and below 1")
        corpus = cls({}, {}, {}, {})
        for domain in domains:
            if domain.name in corpus.train:
                raise DataError(f"domain '{domain.name}' is named twice",
                                hint="give every domain its own name")
            train = _tokenized(domain.train, tokenizer, text_field, seed)
            if not train:
                raise DataError(
                    f"domain '{domain.name}' has no text: its files "
                    f"({_file_list(domain.train)}) hold only empty documents",
                    hint="check the domain's globs and its text field",
                )
            if domain.eval:
                held = _tokenized(domain.eval, tokenizer, text_field, seed)
                if not held:
                    raise DataError(
                        f"domain '{domain.name}' has no eval text: its eval files "
                        f"({_file_list(domain.eval)}) hold only empty documents",
                        hint="check the domain's eval globs, or leave them out to hold out "
                        "part of the training documents",
                    )
            else:
                train, held = _split(train, held_out)
            eos = tokenizer.eos_id
            corpus.train[domain.name] = _stream([t for _, t in train], eos)
            corpus.eval[domain.name] = _stream([t for _, t in held], eos)
            corpus.fingerprints[domain.name] = _fingerprint(domain.train, domain.eval)
            corpus.documents[domain.name] = (len(train), len(held))
        return corpus

    def eval_blocks(self, domain: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
        """The first ``max_tokens`` (all when None) tokens of a domain's eval stream cut into
        consecutive blocks: ``[N, seq_len]``, the last partial block dropped; a stream
        shorter than ``seq_len`` is one shorter block ``[1, len]``, an empty one
        ``[0, seq_len]``."""
        if domain not in self.eval:
            raise DataError(f"no domain '{domain}' in the corpus",
                            hint=did_you_mean(domain, self.eval) or f"domains: {one_of(self.eval)}")
        if seq_len < 1:
            raise DataError(f"seq_len is {seq_len}; it must be at least 1")
        stream = self.eval[domain]
        if max_tokens is not None:
            stream = stream[: max(max_tokens, 0)]
        blocks = stream.numel() // seq_len
        if blocks == 0 and stream.numel() > 0:
            return stream.reshape(1, -1)
        return stream[: blocks * seq_len].reshape(blocks, seq_len)


_Document = tuple[float, array]  # (held-out draw in [0, 1), token ids)


def _tokenized(
    files: Sequence[Path], tokenizer: TextTokenizer, text_field: str, seed: int
) -> list[_Document]:
    """The non-empty documents of ``files``, in order, each with its held-out draw."""
    out: list[_Document] = []
    for path in files:
        texts: list[str] = []
        keys: list[float] = []
        for index, text in enumerate(read_documents(path, text_field=text_field)):
            texts.append(text)
            keys.append(_draw(seed, path.name, index))
            if len(texts) == _ENCODE_CHUNK:
                out.extend(_encoded(keys, texts, tokenizer))
                texts, keys = [], []
        out.extend(_encoded(keys, texts, tokenizer))
    return out


def _encoded(keys: list[float], texts: list[str], tokenizer: TextTokenizer) -> list[_Document]:
    if not texts:
        return []
    ids = tokenizer.encode_batch(texts)
    return [(key, array("q", tokens)) for key, tokens in zip(keys, ids) if tokens]


def _draw(seed: int, name: str, index: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _split(docs: list[_Document], held_out: float) -> tuple[list[_Document], list[_Document]]:
    """(train, eval) documents: the draws below ``held_out`` go to eval."""
    if held_out == 0:
        return docs, []
    if len(docs) == 1:
        key, tokens = docs[0]
        n = len(tokens)
        k = min(n - 1, max(1, round(n * held_out)))  # at least one token on each side
        if k == 0:
            return docs, []
        return [(key, tokens[: n - k])], [(key, tokens[n - k:])]
    held = {i for i, (key, _) in enumerate(docs) if key < held_out}
    if not held:
        held = {min(range(len(docs)), key=lambda i: docs[i][0])}
    if len(held) == len(docs):
        held.remove(max(range(len(docs)), key=lambda i: docs[i][0]))
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]


def _stream(docs: list[array], eos: int) -> torch.Tensor:
    ids = array("q")
    for tokens in docs:
        ids.extend(tokens)
        ids.append(eos)
    if not ids:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(ids, dtype=torch.int64).clone()


def _fingerprint(train: Sequence[Path], held: Sequence[Path]) -> str:
    """sha256 over each file's role, base name and content hash, sorted per role."""
    digest = hashlib.sha256()
    for role, files in (("train", train), ("eval", held)):
        for name, content in sorted((p.name, _sha256_file(p)) for p in files):
            digest.update(f"{role}:{name}:{content}\n".encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    from moecompose.artifact import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _file_list(files: Sequence[Path], limit: int = 3) -> str:
    names = ", ".join(str(p) for p in files[:limit])
    return names + (f" and {len(files) - limit} more" if len(files) > limit else "")


class BatchStream:
    """Training batches: each of the ``sequences`` rows of a batch picks its domain at
    random by the mixture weights (normalised; a weight-0 domain is never picked) and
    takes the next ``seq_len`` tokens of that domain's packed stream. A domain's stream is
    read cyclically in epochs: each epoch (the first too) starts at a fresh random offset
    and reads the whole stream once, wrapping around its end; a stream shorter than
    ``seq_len`` wraps within a row. All draws come from one ``torch.Generator`` seeded by
    ``seed``, so the same corpus, weights, seq_len, sequences and seed give the same
    batches, and ``state_dict``/``load_state_dict`` resume them exactly."""

    def __init__(
        self,
        corpus: Corpus,
        weights: dict[str, float],
        *,
        seq_len: int,
        sequences: int,
        seed: int,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("sequences", sequences)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} is {value!r}; it must be a whole number of at least 1")
        unknown = [d for d in weights if d not in corpus.train]
        if unknown:
            raise DataError(f"no domain '{unknown[0]}' in the corpus",
                            hint=did_you_mean(unknown[0], corpus.train)
                            or f"domains: {one_of(corpus.train)}")
        self.domains = tuple(d for d in corpus.train if d in weights)  # corpus order
        for d in self.domains:
            w = weights[d]
            number = isinstance(w, (int, float)) and not isinstance(w, bool)
            if not number or not math.isfinite(w) or w < 0:
                raise DataError(f"domain '{d}' has weight {w!r}; a weight must be a number >= 0")
            if w > 0 and corpus.train[d].numel() == 0:
                raise DataError(f"domain '{d}' has no training tokens")
        self._sampled = [i for i, d in enumerate(self.domains) if weights[d] > 0]
        if not self._sampled:
            raise DataError("every domain has weight 0",
                            hint="give at least one domain a weight above 0")
        self._probs = torch.tensor([float(weights[self.domains[i]]) for i in self._sampled],
                                   dtype=torch.float64)
        self._streams = [corpus.train[d] for d in self.domains]
        self.seq_len = seq_len
        self.sequences = sequences
        self.seed = seed
        self.batches = 0  # batches returned so far
        self._generator = torch.Generator().manual_seed(seed)
        self._lengths = [s.numel() for s in self._streams]
        self._offsets = [0] * len(self.domains)  # where the current epoch started
        self._consumed = list(self._lengths)  # tokens read this epoch; full: draw a new one
        self._epochs = [0] * len(self.domains)  # epochs started

    def next_batch(self) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The next batch, ``[sequences, seq_len]`` int64, and each row's domain."""
        picks = torch.multinomial(self._probs, self.sequences, replacement=True,
                                  generator=self._generator)
        rows = [self._sampled[int(p)] for p in picks]
        batch = torch.stack([self._take(i, self.seq_len) for i in rows])  # [sequences, seq_len]
        self.batches += 1
        return batch, tuple(self.domains[i] for i in rows)

    def _take(self, i: int, n: int) -> torch.Tensor:
        stream, length = self._streams[i], self._lengths[i]
        pieces = []
        while n > 0:
            if self._consumed[i] == length:
                self._offsets[i] = int(torch.randint(length, (1,), generator=self._generator))
                self._consumed[i] = 0
                self._epochs[i] += 1
            start = (self._offsets[i] + self._consumed[i]) % length
            # up to the end of the epoch or of the stream, whichever comes first
            k = min(n, length - self._consumed[i], length - start)
            pieces.append(stream[start:start + k])
            self._consumed[i] += k
            n -= k
        return torch.cat(pieces)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as JSON-serialisable values (ints, strings, lists)."""
        return {
            "format": STATE_FORMAT,
            "domains": list(self.domains),
            "lengths": list(self._lengths),
            "seq_len": self.seq_len,
            "sequences": self.sequences,
            "seed": self.seed,
            "batches": self.batches,
            "offsets": list(self._offsets),
            "consumed": list(self._consumed),
            "epochs": list(self._epochs),
            "generator": self._generator.get_state().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict`` taken after k batches): the next batch
        is batch k+1 of the uninterrupted stream. A state of another configuration
        (domains, their token counts, seq_len, sequences) is a ``DataError``; the
        generator state wins over this stream's seed, and weights may differ."""
        hint = "resume with the recipe and data the checkpoint was saved with, or start a new run"

        def corrupted(what: str) -> DataError:
            return DataError(f"the checkpoint's data-stream state is corrupted: {what}", hint=hint)

        if not isinstance(state, dict):
            raise corrupted("not an object")
        if state.get("format") != STATE_FORMAT:
            raise corrupted(f"format {_short(state.get('format'))}, not {STATE_FORMAT}")
        expected = {
            "domains": list(self.domains),
            "lengths": self._lengths,
            "seq_len": self.seq_len,
            "sequences": self.sequences,
        }
        for key, ours in expected.items():
            if state.get(key) != ours:
                raise DataError(f"the checkpoint does not match this training data: its {key} "
                                f"is {_short(state.get(key))}, here {_short(ours)}", hint=hint)
        n = len(self.domains)
        lists = {key: state.get(key) for key in ("offsets", "consumed", "epochs")}
        for key, values in lists.items():
            if not (isinstance(values, list) and len(values) == n and all(map(_whole, values))):
                raise corrupted(f"bad {key}")
        positions = zip(lists["offsets"], lists["consumed"], self._lengths)
        if not all(o < max(m, 1) and c <= m for o, c, m in positions):
            raise corrupted("positions out of range")
        if not _whole(state.get("batches")):
            raise corrupted("bad batches")
        gen = state.get("generator")
        size = self._generator.get_state().numel()
        if not (isinstance(gen, list) and len(gen) == size and all(_byte(v) for v in gen)):
            raise corrupted("bad generator state")
        try:
            self._generator.set_state(torch.tensor(gen, dtype=torch.uint8))
        except RuntimeError as exc:
            raise corrupted(str(exc)) from None
        self._offsets = list(lists["offsets"])
        self._consumed = list(lists["consumed"])
        self._epochs = list(lists["epochs"])
        self.batches = state["batches"]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _byte(value: Any) -> bool:
    return _whole(value) and value < 256


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
