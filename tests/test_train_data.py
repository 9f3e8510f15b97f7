"""The training data pipeline: globs, documents, tokens, held-out splits, packed batches."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from moecompose.errors import DataError, Location
from moecompose.training import data
from moecompose.training.data import (
    BatchStream,
    Corpus,
    DomainFiles,
    TextTokenizer,
    find_files,
    read_documents,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = [f"w{i}" for i in range(100)]
EOS = 2


def ids(text: str) -> list[int]:
    """The ids the test tokenizer gives ``text`` (words ``w0``.. are ids 4..)."""
    return [4 + int(w[1:]) for w in text.split()]


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + i) % len(WORDS)}" for i in range(n))


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    """A fake artifact folder holding a word-level tokenizer.json that, left alone, would
    add <s> to every text and truncate it to 4 tokens."""
    folder = tmp_path / "artifact"
    folder.mkdir()
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.enable_truncation(max_length=4)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def tokenizer(artifact: Path) -> TextTokenizer:
    return TextTokenizer.from_artifact(artifact, EOS)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def load(domains: list[DomainFiles], tokenizer: TextTokenizer, held_out: float = 0.0,
         seed: int = 0) -> Corpus:
    return Corpus.load(domains, tokenizer, held_out=held_out, seed=seed)


def toy_corpus(**streams: list[int]) -> Corpus:
    train = {name: torch.tensor(s, dtype=torch.int64) for name, s in streams.items()}
    return Corpus(train, {n: torch.empty(0, dtype=torch.int64) for n in train},
                  dict.fromkeys(train, ""), {n: (1, 0) for n in train})


# --- globs -------------------------------------------------------------------------------


def test_globs_recurse_sort_dedupe_and_skip_folders(tmp_path: Path) -> None:
    for rel in ("a/x.txt", "a/b/y.txt", "a/b/c/z.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("w1")
    (tmp_path / "a/folder.txt").mkdir()
    found = find_files(["a/**/*.txt", "a/x.txt"], tmp_path)
    assert found == tuple(tmp_path / r for r in ("a/b/c/z.txt", "a/b/y.txt", "a/x.txt"))


def test_absolute_glob_ignores_base_dir(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("w1")
    assert find_files([str(tmp_path / "*.txt")], tmp_path / "elsewhere") == (tmp_path / "d.txt",)


def test_glob_matching_nothing_names_pattern_folder_and_location(tmp_path: Path) -> None:
    where = Location("recipe.yaml", 7, 3)
    with pytest.raises(DataError) as info:
        find_files(["law/*.jsonl"], tmp_path, where=where)
    assert info.value.location == where
    assert "'law/*.jsonl' matches no file" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_glob_matching_only_folders_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "shards" / "one").mkdir(parents=True)
    with pytest.raises(DataError, match="'shards/\\*' matches only folders"):
        find_files(["shards/*"], tmp_path)


# --- documents ---------------------------------------------------------------------------


def test_jsonl_gives_one_document_per_non_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1 w2"}\n\n   \n{"text": "w3", "id": 4}\r\n{"text": ""}')
    assert list(read_documents(path)) == ["w1 w2", "w3", ""]


def test_jsonl_reads_the_named_text_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"content": "w5", "text": 3}\n')
    assert list(read_documents(path, text_field="content")) == ["w5"]


def test_bad_json_line_is_located_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1"}\n\n{"text": "w2",}\n')
    with pytest.raises(DataError, match="not valid JSON") as info:
        list(read_documents(path))
    assert (info.value.location.file, info.value.location.line) == (str(path), 3)


def test_jsonl_line_without_the_field_names_it_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1"}\n{"txt": "w2"}\n')
    with pytest.raises(DataError, match="no 'text' field") as info:
        list(read_documents(path))
    assert info.value.location.line == 2
    assert "did you mean 'txt'?" in str(info.value)


def test_jsonl_text_that_is_not_a_string_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ["w1"]}\n')
    with pytest.raises(DataError, match="'text' is a JSON array, not a string"):
        list(read_documents(path))


def test_jsonl_line_that_is_not_an_object_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('"w1"\n')
    with pytest.raises(DataError, match="a JSON string, not an object"):
        list(read_documents(path))


def test_jsonl_line_nested_too_deep_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1", "x": ' + "[" * 100 + "]" * 100 + "}\n")
    with pytest.raises(DataError, match="nested more than 64 levels") as info:
        list(read_documents(path))
    assert info.value.location.line == 1


def test_jsonl_line_longer_than_the_bound_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 32)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "w1"}\n{"text": "' + "w1 " * 20 + '"}\n')
    with pytest.raises(DataError, match="longer than") as info:
        list(read_documents(path))
    assert info.value.location.line == 2


def test_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"\xef\xbb\xbfw1\n\nw2\n")
    assert list(read_documents(path)) == ["w1\n\nw2\n"]


def test_text_file_that_is_not_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes("w1 é\nw2\nw3 \xff w4\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as info:
        list(read_documents(path))
    assert (info.value.location.file, info.value.location.line) == (str(path), 1)
    path.write_bytes(b"w1\nw2\nw3 \xff w4\n")
    with pytest.raises(DataError) as info:
        list(read_documents(path))
    assert info.value.location.line == 3


def test_a_folder_given_as_data_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder"):
        list(read_documents(tmp_path))


# --- tokenizer ---------------------------------------------------------------------------


def test_encode_adds_no_special_tokens_and_does_not_truncate(tokenizer: TextTokenizer) -> None:
    assert tokenizer.encode(words(6)) == ids(words(6))
    assert tokenizer.encode_batch(["w1 w2", "", words(5)]) == [ids("w1 w2"), [], ids(words(5))]
    assert (tokenizer.eos_id, tokenizer.vocab_size) == (EOS, len(SPECIALS) + len(WORDS))


def test_missing_tokenizer_json_names_the_artifact(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has no tokenizer\.json") as info:
        TextTokenizer.from_artifact(tmp_path, EOS)
    assert str(tmp_path) in str(info.value)
    assert info.value.hint


def test_eos_comes_from_tokenizer_config_when_config_has_none(artifact: Path) -> None:
    (artifact / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    assert TextTokenizer.from_artifact(artifact, None).eos_id == 3


def test_eos_falls_back_to_a_well_known_token_of_the_vocabulary(artifact: Path) -> None:
    assert TextTokenizer.from_artifact(artifact, None).eos_id == SPECIALS.index("</s>")


def test_no_eos_anywhere_is_an_error(tmp_path: Path) -> None:
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "w1": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-sequence token"):
        TextTokenizer.from_artifact(tmp_path, None)


# --- corpus ------------------------------------------------------------------------------


def test_documents_are_followed_by_one_eos_and_empty_ones_add_nothing(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ["w1 w2", "", "w3"])
    b = tmp_path / "b.txt"
    b.write_text("w4 w5 w6 w7 w8")
    corpus = load([DomainFiles("d", (a, b))], tokenizer)
    expected = [*ids("w1 w2"), EOS, *ids("w3"), EOS, *ids("w4 w5 w6 w7 w8"), EOS]
    assert corpus.train["d"].tolist() == expected
    assert corpus.train["d"].dtype == torch.int64
    assert corpus.eval["d"].numel() == 0
    assert corpus.documents["d"] == (3, 0)


def test_a_domain_of_empty_documents_names_the_domain_and_its_files(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ["", "  "])
    with pytest.raises(DataError, match="domain 'law' has no text") as info:
        load([DomainFiles("law", (a,))], tokenizer, held_out=0.1)
    assert str(a) in str(info.value)


def test_held_out_split_is_deterministic_and_a_partition(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    texts = [words(3, start=3 * i) for i in range(40)]
    domain = [DomainFiles("d", (write_jsonl(tmp_path / "d.jsonl", texts),))]
    first, again = load(domain, tokenizer, 0.25, seed=1), load(domain, tokenizer, 0.25, seed=1)
    assert torch.equal(first.train["d"], again.train["d"])
    assert torch.equal(first.eval["d"], again.eval["d"])
    n_train, n_eval = first.documents["d"]
    assert n_train + n_eval == 40 and 0 < n_eval < 40
    assert first.train["d"].numel() + first.eval["d"].numel() == 40 * 4
    other = load(domain, tokenizer, 0.25, seed=2)
    assert not torch.equal(other.eval["d"], first.eval["d"])


@pytest.mark.parametrize("held_out", [0.001, 0.999])
def test_held_out_keeps_one_document_on_each_side(
    tmp_path: Path, tokenizer: TextTokenizer, held_out: float
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["w1 w2", "w3 w4"])
    corpus = load([DomainFiles("d", (path,))], tokenizer, held_out)
    assert corpus.documents["d"] == (1, 1)
    assert sorted([corpus.train["d"].tolist(), corpus.eval["d"].tolist()]) == [
        [*ids("w1 w2"), EOS], [*ids("w3 w4"), EOS]]


def test_a_single_document_holds_out_its_last_tokens(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    path = tmp_path / "only.txt"
    path.write_text(words(10))
    corpus = load([DomainFiles("d", (path,))], tokenizer, held_out=0.2)
    assert corpus.train["d"].tolist() == [*ids(words(8)), EOS]
    assert corpus.eval["d"].tolist() == [*ids(words(2, start=8)), EOS]


def test_eval_files_are_the_eval_stream_and_all_documents_train(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ["w1", "w2", "w3"])
    held = write_jsonl(tmp_path / "eval.jsonl", ["w9 w8"])
    corpus = load([DomainFiles("d", (train,), (held,))], tokenizer, held_out=0.5)
    assert corpus.train["d"].tolist() == [*ids("w1"), EOS, *ids("w2"), EOS, *ids("w3"), EOS]
    assert corpus.eval["d"].tolist() == [*ids("w9 w8"), EOS]
    assert corpus.documents["d"] == (3, 1)


def test_fingerprints_survive_a_move_and_change_with_content(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    def fingerprint(folder: Path) -> str:
        files = find_files(["*.jsonl"], folder)
        return load([DomainFiles("d", files)], tokenizer).fingerprints["d"]

    write_jsonl(tmp_path / "one" / "a.jsonl", ["w1", "w2"])
    write_jsonl(tmp_path / "one" / "b.jsonl", ["w3"])
    before = fingerprint(tmp_path / "one")
    shutil.move(tmp_path / "one", tmp_path / "two")
    assert fingerprint(tmp_path / "two") == before
    write_jsonl(tmp_path / "two" / "b.jsonl", ["w4"])
    assert fingerprint(tmp_path / "two") != before


def test_eval_blocks_are_consecutive_full_blocks_or_one_short_block() -> None:
    corpus = toy_corpus(d=[1])
    corpus.eval["d"] = torch.arange(10)
    assert corpus.eval_blocks("d", 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert corpus.eval_blocks("d", 16).tolist() == [list(range(10))]
    assert corpus.eval_blocks("d", 4, max_tokens=6).tolist() == [[0, 1, 2, 3]]
    assert corpus.eval_blocks("d", 4, max_tokens=3).shape == (1, 3)
    corpus.eval["d"] = torch.empty(0, dtype=torch.int64)
    assert corpus.eval_blocks("d", 4).shape == (0, 4)


# --- batches -----------------------------------------------------------------------------


def batches(stream: BatchStream, n: int) -> list[tuple[torch.Tensor, tuple[str, ...]]]:
    return [stream.next_batch() for _ in range(n)]


def test_same_seed_gives_same_batches_and_another_seed_others() -> None:
    corpus = toy_corpus(a=list(range(100, 137)), b=list(range(200, 223)))

    def make(seed: int) -> BatchStream:
        return BatchStream(corpus, {"a": 1.0, "b": 2.0}, seq_len=8, sequences=4, seed=seed)

    one, two = batches(make(5), 6), batches(make(5), 6)
    for (x, dx), (y, dy) in zip(one, two):
        assert torch.equal(x, y) and dx == dy
        assert x.shape == (4, 8) and x.dtype == torch.int64
    other = batches(make(6), 6)
    assert any(not torch.equal(x, y) for (x, _), (y, _) in zip(one, other))


def test_each_row_comes_from_the_domain_it_names() -> None:
    streams = {"a": list(range(100, 113)), "b": list(range(200, 205))}
    stream = BatchStream(toy_corpus(**streams), {"a": 1, "b": 1}, seq_len=8, sequences=6, seed=0)
    for batch, domains in batches(stream, 5):
        for row, domain in zip(batch.tolist(), domains):
            assert set(row) <= set(streams[domain])


def test_a_stream_shorter_than_a_row_wraps_within_the_row() -> None:
    stream = BatchStream(toy_corpus(d=[7, 8, 9]), {"d": 1}, seq_len=8, sequences=1, seed=4)
    row = stream.next_batch()[0][0].tolist()
    assert sorted(row[:3]) == sorted(row[3:6]) == [7, 8, 9]  # two whole epochs, then part of one
    assert len(row) == 8


def test_one_epoch_reads_every_token_once() -> None:
    corpus = toy_corpus(d=list(range(12)))
    stream = BatchStream(corpus, {"d": 1.0}, seq_len=4, sequences=3, seed=3)
    batch, _ = stream.next_batch()
    flat = batch.flatten().tolist()
    assert sorted(flat) == list(range(12))
    assert all((b - a) % 12 == 1 for a, b in itertools.pairwise(flat))


def test_resume_from_state_continues_the_same_batches() -> None:
    corpus = toy_corpus(a=list(range(100, 131)), b=list(range(200, 205)), c=list(range(300, 350)))
    weights = {"a": 1.0, "b": 0.5, "c": 2.0}

    def make() -> BatchStream:
        return BatchStream(corpus, weights, seq_len=7, sequences=3, seed=11)

    whole = batches(make(), 8)
    first = make()
    batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for (x, dx), (y, dy) in zip(whole[3:], batches(resumed, 5)):
        assert torch.equal(x, y) and dx == dy


def test_state_of_another_configuration_does_not_match() -> None:
    corpus = toy_corpus(a=list(range(20)), b=list(range(30)))
    state = BatchStream(corpus, {"a": 1, "b": 1}, seq_len=4, sequences=2, seed=0).state_dict()
    for other in (
        BatchStream(corpus, {"a": 1, "b": 1}, seq_len=5, sequences=2, seed=0),
        BatchStream(corpus, {"a": 1, "b": 1}, seq_len=4, sequences=3, seed=0),
        BatchStream(corpus, {"a": 1}, seq_len=4, sequences=2, seed=0),
        BatchStream(toy_corpus(a=list(range(21)), b=list(range(30))), {"a": 1, "b": 1},
                    seq_len=4, sequences=2, seed=0),
    ):
        with pytest.raises(DataError, match="checkpoint does not match"):
            other.load_state_dict(state)


def test_corrupted_state_is_an_error_not_a_traceback() -> None:
    stream = BatchStream(toy_corpus(a=list(range(20))), {"a": 1}, seq_len=4, sequences=2, seed=0)
    state = stream.state_dict()
    for broken in ({**state, "generator": [300] * len(state["generator"])},
                   {**state, "offsets": [25]}, {k: v for k, v in state.items() if k != "batches"},
                   []):
        with pytest.raises(DataError, match="corrupted"):
            stream.load_state_dict(broken)


def test_a_weight_zero_domain_is_never_sampled() -> None:
    corpus = toy_corpus(a=list(range(10)), b=list(range(10)), off=list(range(10)))
    stream = BatchStream(corpus, {"a": 1, "off": 0, "b": 1}, seq_len=2, sequences=50, seed=0)
    seen = {d for _, domains in batches(stream, 20) for d in domains}
    assert seen == {"a", "b"}


def test_mixture_weights_set_the_share_of_rows() -> None:
    corpus = toy_corpus(a=list(range(50)), b=list(range(50)))
    stream = BatchStream(corpus, {"a": 3, "b": 1}, seq_len=2, sequences=100, seed=1)
    rows = [d for _, domains in batches(stream, 40) for d in domains]
    n, p = len(rows), 0.75
    bound = 5 * math.sqrt(n * p * (1 - p))  # 5 standard deviations of Binomial(n, p)
    assert abs(rows.count("a") - n * p) <= bound


def test_unknown_or_negative_weights_are_errors() -> None:
    corpus = toy_corpus(a=[1, 2, 3])
    with pytest.raises(DataError, match="did you mean 'a'"):
        BatchStream(corpus, {"aa": 1}, seq_len=2, sequences=1, seed=0)
    with pytest.raises(DataError, match="weight -1"):
        BatchStream(corpus, {"a": -1}, seq_len=2, sequences=1, seed=0)
    with pytest.raises(DataError, match="every domain has weight 0"):
        BatchStream(corpus, {"a": 0}, seq_len=2, sequences=1, seed=0)
