"""The embedding engine of the build stage: mean hidden states against transformers,
prompt router rows, stored vectors, and the on-disk cache."""

from __future__ import annotations

import functools
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from moecompose.build.embed import (
    CACHE_ENV,
    Embedder,
    EmbeddingCache,
    nearly_parallel_rows,
    prompt_router_rows,
    read_embedding_file,
    read_texts,
    weights_fingerprint,
)
from moecompose.errors import BuildError, SourceError
from moecompose.sources.vectors import embedding_width, files_fingerprint
from moecompose.testing import make_dense

DOCS = [
    "the law of the court is the case that the contract is in",
    "def function return value print import class if else",
    "the proof of the theorem is an equation with the matrix",
]
PROMPTS = {
    "code": ["def function return value", "import math print sum"],
    "law": ["the court and the law", "the contract of the case"],
    "math": ["the proof of the theorem", "the matrix equation"],
}
NEGATIVE = {"law": ["the data model"]}


@functools.cache
def _embedder(path: Path) -> Embedder:
    return Embedder.load(path.name, path)


@functools.cache
def _hf(path: Path) -> tuple[transformers.PreTrainedTokenizerBase, torch.nn.Module]:
    # AutoTokenizer maps model_type qwen2 to Qwen2Tokenizer, which rebuilds a byte-level
    # BPE instead of reading the tiny character-level tokenizer.json; the fast tokenizer reads
    # the file as it is, post-processor included.
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return tokenizer, model


def hf_means(path: Path, texts: list[str], max_tokens: int) -> torch.Tensor:
    """[L + 1, d]: transformers' hidden_states[i] (i < L) and last_hidden_state (i = L),
    mean over each text's tokens, then over texts."""
    tokenizer, model = _hf(path)
    per_text = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.model(ids, output_hidden_states=True)
        states = [*out.hidden_states[:-1], out.last_hidden_state]
        per_text.append(torch.stack([h[0].mean(dim=0) for h in states]))
    return torch.stack(per_text).mean(dim=0)


def copy_source(sources: dict[str, Path], tmp_path: Path, name: str = "seed", **ignore: bool) -> Path:
    out = tmp_path / f"{name}-copy"
    skip = shutil.ignore_patterns(*ignore) if ignore else None
    shutil.copytree(sources[name], out, ignore=skip)
    return out


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("name", ["seed", "qwen_seed", "tied", "mistral_window"])
@pytest.mark.parametrize("max_tokens", [512, 3])
def test_text_embedding_is_transformers_last_hidden_state_mean(
    sources: dict[str, Path], name: str, max_tokens: int
) -> None:
    ours = _embedder(sources[name]).text_embedding(DOCS, max_tokens)
    expected = hf_means(sources[name], DOCS, max_tokens)[-1]
    assert ours.shape == (64,) and ours.dtype == torch.float32
    assert not ours.is_inference()  # usable where autograd runs, e.g. as a Parameter's data
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_truncation_keeps_the_special_tokens_the_tokenizer_adds(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    path = copy_source(sources, tmp_path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tokenizer.save(str(path / "tokenizer.json"))
    embedder = Embedder.load("bos", path)
    for max_tokens in (512, 4):
        expected = hf_means(path, DOCS, max_tokens)[-1]
        torch.testing.assert_close(embedder.text_embedding(DOCS, max_tokens), expected, atol=1e-5, rtol=0)
    # fewer tokens than the special ones: tokenizers cannot truncate, the slice does
    assert embedder.text_embedding(["the law"], 1).shape == (64,)


def test_texts_are_truncated_to_max_position_embeddings(tmp_path: Path) -> None:
    path = make_dense(tmp_path / "short", seed=9, max_position_embeddings=4)
    ours = Embedder.load("short", path).text_embedding(DOCS, 512)
    torch.testing.assert_close(ours, hf_means(path, DOCS, 4)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["seed", "qwen_seed", "mistral_window"])
def test_layer_inputs_are_transformers_hidden_states_means(
    sources: dict[str, Path], name: str
) -> None:
    layers = [0, 1, 3]
    ours = _embedder(sources[name]).layer_inputs(DOCS, layers, 5)
    expected = hf_means(sources[name], DOCS, 5)
    assert sorted(ours) == layers
    for i in layers:
        torch.testing.assert_close(ours[i], expected[i], atol=1e-5, rtol=0)


def test_each_text_weighs_the_same(sources: dict[str, Path]) -> None:
    embedder = _embedder(sources["seed"])
    alone = [embedder.text_embedding([doc], 512) for doc in DOCS]
    torch.testing.assert_close(embedder.text_embedding(DOCS, 512), torch.stack(alone).mean(dim=0))


def test_file_embedding_reads_one_document_per_file(sources: dict[str, Path], tmp_path: Path) -> None:
    files = []
    for k, doc in enumerate(DOCS):
        files.append(tmp_path / f"doc{k}.txt")
        files[-1].write_text(doc + "\n")
    embedder = _embedder(sources["seed"])
    texts = [doc + "\n" for doc in DOCS]  # the newline is a token of the character-level tokenizer
    assert read_texts(files) == texts
    torch.testing.assert_close(embedder.file_embedding(files, 512), embedder.text_embedding(texts, 512))


def test_layer_outside_the_model_is_refused(sources: dict[str, Path]) -> None:
    with pytest.raises(BuildError, match="has no decoder layer 4"):
        _embedder(sources["seed"]).layer_inputs(DOCS, [0, 4], 8)


def test_text_with_zero_tokens_is_named(sources: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match=r"b\.txt tokenises to zero tokens"):
        _embedder(sources["seed"]).text_embedding(["the law", ""], 8, names=["a.txt", "b.txt"])


def test_source_without_tokenizer_json_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    path = copy_source(sources, tmp_path, **{"tokenizer.json": True})
    with pytest.raises(SourceError, match="embedding texts needs the source's tokenizer") as info:
        Embedder.load("seed", path)
    assert str(path) in str(info.value)


def test_corrupt_tokenizer_json_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    path = copy_source(sources, tmp_path)
    (path / "tokenizer.json").write_text("{")
    with pytest.raises(SourceError, match=r"cannot read tokenizer\.json"):
        Embedder.load("seed", path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read text file"), (b"", "is empty"), (b" \n\t", "is empty"),
     (b"\xff\xfe\x00law", "is not UTF-8 text")],
)
def test_unusable_text_files_are_named(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=message) as info:
        read_texts([path])
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- router rows


def test_prompt_router_rows_are_normalised_mean_minus_negative_mean(sources: dict[str, Path]) -> None:
    path, layers = sources["seed"], [0, 2, 3]
    rows = prompt_router_rows(_embedder(path), PROMPTS, NEGATIVE, layers, 512)
    assert sorted(rows) == layers
    for i in layers:
        assert rows[i].shape == (3, 64) and rows[i].dtype == torch.float32
        torch.testing.assert_close(rows[i].norm(dim=-1), torch.ones(3))
        for e, expert in enumerate(PROMPTS):
            expected = hf_means(path, PROMPTS[expert], 512)[i]
            if expert in NEGATIVE:
                expected = expected - hf_means(path, NEGATIVE[expert], 512)[i]
            torch.testing.assert_close(rows[i][e], F.normalize(expected, dim=0), atol=1e-5, rtol=0)
    assert nearly_parallel_rows(rows, list(PROMPTS)) == []


def test_nearly_parallel_rows_are_reported(sources: dict[str, Path]) -> None:
    prompts = {"code": PROMPTS["code"], "law": PROMPTS["law"], "copy": PROMPTS["code"]}
    rows = prompt_router_rows(_embedder(sources["seed"]), prompts, None, [0, 1, 2, 3], 512)
    assert nearly_parallel_rows(rows, list(prompts)) == [
        "rows for experts 'code' and 'copy' are nearly parallel at layers 0-3 (cos 1.00): "
        "give more distinctive prompts"
    ]


def test_parallel_rows_name_only_the_layers_where_they_are() -> None:
    rows = {0: torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 5: torch.tensor([[1.0, 0.0], [0.99, 0.1]])}
    assert nearly_parallel_rows(rows, ["a", "b"]) == [
        "rows for experts 'a' and 'b' are nearly parallel at layer 5 (cos 0.99): "
        "give more distinctive prompts"
    ]


@pytest.mark.parametrize(
    ("prompts", "negative", "message"),
    [
        ({"code": []}, None, "expert 'code' has no prompts"),
        ({"code": ["def"]}, {"law": ["the law"]}, "name expert 'law', which has no prompts"),
        ({"code": ["def return"]}, {"code": ["def return"]}, "give the same mean state at layer 0"),
    ],
)
def test_unusable_prompts_are_refused(
    sources: dict[str, Path], prompts: dict, negative: dict | None, message: str
) -> None:
    with pytest.raises(BuildError, match=message):
        prompt_router_rows(_embedder(sources["seed"]), prompts, negative, [0], 16)


# --------------------------------------------------------------------------- stored vectors


def npy_bytes(values: list[float], descr: str = "<f4", shape: tuple[int, ...] | None = None,
              fortran: bool = False, version: int = 1) -> bytes:
    """A .npy file as numpy writes it (format 1.0 or 2.0)."""
    shape = (len(values),) if shape is None else shape
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    size = 2 if version == 1 else 4
    header += " " * (-(6 + 2 + size + len(header) + 1) % 64) + "\n"
    length = struct.pack("<H" if version == 1 else "<I", len(header))
    data = struct.pack(descr[0] + {"f2": "e", "f4": "f", "f8": "d", "i4": "i"}[descr[1:]] * len(values),
                       *values)
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode("latin1") + data


VALUES = [0.5, -1.25, 2.0, 3.5]


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("v.npy", npy_bytes(VALUES)),
        ("v.npy", npy_bytes(VALUES, "<f2")),
        ("v.npy", npy_bytes(VALUES, "<f8", shape=(1, 4))),
        ("v.npy", npy_bytes(VALUES, version=2)),
    ],
)
def test_npy_vectors_are_read_without_numpy(tmp_path: Path, file: str, content: bytes) -> None:
    path = tmp_path / file
    path.write_bytes(content)
    assert embedding_width(path) == 4
    vector = read_embedding_file(path)
    assert vector.dtype == torch.float32
    assert vector.tolist() == VALUES


@pytest.mark.parametrize(
    ("tensors", "key"),
    [
        ({"v": torch.tensor(VALUES)}, None),
        ({"emb": torch.tensor([VALUES], dtype=torch.bfloat16)}, None),
        ({"law": torch.tensor(VALUES), "code": torch.zeros(7)}, "law"),
    ],
)
def test_safetensors_vectors_are_read(tmp_path: Path, tensors: dict, key: str | None) -> None:
    path = tmp_path / "v.safetensors"
    save_file(tensors, str(path))
    assert embedding_width(path, key) == 4
    assert read_embedding_file(path, key).tolist() == VALUES


def _write_safetensors(path: Path, tensors: dict) -> None:
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("file", "make", "key", "message"),
    [
        ("v.safetensors", lambda p: _write_safetensors(p, {"v": torch.zeros(2, 4)}), None,
         r"shape \[2, 4\], not one vector"),
        ("v.safetensors", lambda p: _write_safetensors(p, {"a": torch.zeros(4), "b": torch.zeros(4)}),
         None, r"holds 2 tensors \(a, b\).*name the one to use with 'key'"),
        ("v.safetensors", lambda p: _write_safetensors(p, {"a": torch.zeros(4)}), "law",
         "has no tensor 'law'"),
        ("v.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]      "),
         None, r"is not a safetensors file \(bad header\)"),
        ("v.npy", lambda p: p.write_bytes(b"\x93NUMPY"), None, "is not a .npy file"),
        ("v.safetensors", lambda p: p.write_bytes(b"garbage"), None, "not a safetensors file"),
        ("v.npy", lambda p: p.write_bytes(npy_bytes(VALUES, ">f4")), None, "has dtype '>f4'"),
        ("v.npy", lambda p: p.write_bytes(npy_bytes([1, 2], "<i4")), None, "has dtype '<i4'"),
        ("v.npy", lambda p: p.write_bytes(npy_bytes(VALUES, shape=(1, 4), fortran=True)), None,
         "Fortran order"),
        ("v.npy", lambda p: p.write_bytes(npy_bytes(VALUES)[:-3]), None, "truncated"),
        ("v.npy", lambda p: p.write_bytes(npy_bytes([float("nan")] * 4)), None, "NaN"),
        ("v.npy", lambda p: p.write_bytes(b"PK\x03\x04 not npy"), None, "not a .npy file"),
        ("v.pt", lambda p: p.write_bytes(b"x"), None, "use .safetensors or .npy"),
        ("v.npy", lambda p: None, None, "does not exist"),
    ],
)
def test_unusable_vector_files_are_named(
    tmp_path: Path, file: str, make, key: str | None, message: str
) -> None:
    path = tmp_path / file
    make(path)
    with pytest.raises(SourceError, match=message) as info:
        read_embedding_file(path, key)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- cache


def test_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert EmbeddingCache().root == tmp_path / "here"


def test_cache_key_is_canonical_json_of_its_parts() -> None:
    cache = EmbeddingCache(Path("unused"))
    assert cache.key(a=1, b=[Path("/x"), "y"]) == cache.key(b=["/x", "y"], a=1)
    assert cache.key(a=1) != cache.key(a=2)
    assert len(cache.key()) == 64


def test_second_embedding_with_the_same_key_loads_no_model(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    loads: list[str] = []
    load = Embedder.load

    def counting_load(name: str, path: Path) -> Embedder:
        loads.append(name)
        return load(name, path)

    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text(DOCS[0])
    files[1].write_text(DOCS[1])

    def domain_vector() -> torch.Tensor:
        cache = EmbeddingCache()
        key = cache.key(what="domain", source=weights_fingerprint(sources["seed"]),
                        texts=files_fingerprint(files), max_tokens=16)
        return cache.get_or_compute(key, lambda: counting_load("seed", sources["seed"]).file_embedding(files, 16))

    first = domain_vector()
    assert loads == ["seed"]
    assert torch.equal(domain_vector(), first)
    assert loads == ["seed"]
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".safetensors"]  # no temp file left

    before = files_fingerprint(files)
    files[1].write_text(DOCS[2])
    assert files_fingerprint(files) != before
    changed = domain_vector()
    assert loads == ["seed", "seed"]
    torch.testing.assert_close(changed, _embedder(sources["seed"]).text_embedding([DOCS[0], DOCS[2]], 16))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other key"])
def test_corrupt_cache_entry_is_recomputed(tmp_path: Path, damage: str) -> None:
    cache = EmbeddingCache(tmp_path)
    key, other = cache.key(n=1), cache.key(n=2)
    value = torch.arange(6.0).reshape(2, 3)
    cache.put(key, value)
    assert torch.equal(cache.get(key), value)
    path = cache.path(key)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-5])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 40)
    else:
        cache.put(other, value + 1)
        shutil.copyfile(cache.path(other), path)
    assert cache.get(key) is None
    calls = []
    assert torch.equal(cache.get_or_compute(key, lambda: calls.append(1) or value), value)
    assert calls == [1]
    assert torch.equal(cache.get(key), value)


def test_unwritable_cache_warns_and_still_computes(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = EmbeddingCache(blocker)
    with pytest.warns(UserWarning, match="cannot write the embedding cache"):
        assert cache.get_or_compute(cache.key(n=1), lambda: torch.ones(3)).tolist() == [1.0] * 3


def test_weights_fingerprint_follows_weights_config_and_tokenizer(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    path = copy_source(sources, tmp_path)
    seen = {weights_fingerprint(path)}
    assert weights_fingerprint(path) in seen
    weights = path / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    seen.add(weights_fingerprint(path))
    (path / "config.json").write_text((path / "config.json").read_text() + "\n")
    seen.add(weights_fingerprint(path))
    (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text() + "\n")
    seen.add(weights_fingerprint(path))
    assert len(seen) == 4
