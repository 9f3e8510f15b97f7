"""The .moe text syntax: same IR as YAML, located errors with a caret, positions that
later stages use."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import moecompose as mc
from moecompose import SpecError
from moecompose.cli import main
from moecompose.spec import parse_spec
from moecompose.spec.schema import CopyExperts, LayerRange, MergeWeights, TopKRouter

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["demo", "sparse_upcycling", "btx", "bam", "nexus", "pesc", "mixture_of_tokens"]
HEAD = "moecompose 1\nsources { a = ./x }\n"


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_parses_to_the_same_spec_in_both_syntaxes(name: str) -> None:
    from_yaml = mc.load_spec(ROOT / "specs" / f"{name}.yaml", check=False)
    from_dsl = mc.load_spec(ROOT / "specs" / f"{name}.moe", check=False)
    assert from_dsl == from_yaml
    result = mc.diff(ROOT / "specs" / f"{name}.yaml", ROOT / "specs" / f"{name}.moe")
    assert result.equal, result.to_data()
    assert CliRunner().invoke(main, ["diff", f"specs/{name}.yaml", f"specs/{name}.moe"]).exit_code == 0


def test_the_terse_form_reads_as_the_yaml_it_stands_for() -> None:
    spec = parse_spec(
        """
        moecompose 1   # format version
        name btx
        sources { seed = ./dense/seed; code = ./dense/code }
        merge weights(seed=3, code=1)
        layers 0..4 every 2 {
          ffn experts [seed, code] router topk(k=1, normalize=false)
        }
        layers [1] { ffn experts=copy(seed, count=8, drop=0.5) aux_loss=(z_loss=0.0) }
        output format=native max_shard_size=500MB
        """,
        syntax="dsl",
    )
    assert spec == parse_spec(
        """
        moecompose: 1
        name: btx
        sources: {seed: ./dense/seed, code: ./dense/code}
        merge: {weights: {seed: 3, code: 1}}
        layers:
          - select: {from: 0, to: 4, every: 2}
            ffn: {experts: [seed, code], router: {kind: topk, k: 1, normalize: false}}
          - select: [1]
            ffn:
              experts: {copy: seed, count: 8, drop: 0.5}
              aux_loss: {z_loss: 0}
        output: {format: native, max_shard_size: 500MB}
        """.replace("\n        ", "\n")
    )
    assert spec.layers[0].select == LayerRange(**{"from": 0, "to": 4, "every": 2})
    assert spec.layers[1].ffn is not None
    assert spec.layers[1].ffn.experts == CopyExperts(copy="seed", count=8, drop=0.5)
    assert isinstance(spec.merge, MergeWeights)


def test_every_spelling_of_a_value_means_the_same() -> None:
    spellings = [
        "router=topk(k=1)", "router=topk(1)", "router topk(k=1)", "router={kind topk; k 1}",
        "router=(kind=topk, k=1)", "router { kind = topk\n k = 1 }",
    ]
    specs = [parse_spec(HEAD + f"layers all {{ ffn experts=[a, a] {s} }}\n", syntax="dsl")
             for s in spellings]
    assert all(s == specs[0] for s in specs)
    router = specs[0].layers[0].ffn.router  # type: ignore[union-attr]
    assert isinstance(router, TopKRouter) and router.k == 1


def test_quoted_text_and_keywords() -> None:
    spec = parse_spec('moecompose 1\nname "a b # not a comment"\nsources { "true" = "./my dir/x" }\n',
                      syntax="dsl")
    assert spec.name == "a b # not a comment" and spec.sources == {"true": "./my dir/x"}


MALFORMED = [
    # (text, line, column, words the message must contain)
    (HEAD + "merge: average\n", 3, 6, "unexpected character ':'"),
    (HEAD + "layers all {\n  ffn experts=[a]\n", 3, 12, "never closed"),
    (HEAD + "layers all { ffn experts=[a, a }\n", 3, 32, "does not match the '['"),
    (HEAD + "merge average }\n", 3, 15, "closes nothing"),
    (HEAD + 'name "abc\n', 3, 6, "quoted text is never closed"),
    (HEAD + "seed\n", 3, 5, "expected a value after 'seed'"),
    (HEAD + "= 3\n", 3, 1, "expected a key"),
    (HEAD + "layers all { ffn experts=[a, a] router=topc(k=1) }\n", 3, 40, "unknown router kind 'topc'"),
    (HEAD + "layers all { ffn experts=copi(a, count=2) }\n", 3, 26, "unknown form 'copi(...)'"),
    (HEAD + "layers all { ffn experts=copy(a, 2, 0.5, 7) }\n", 3, 42, "too many values"),
    (HEAD + "train [router=1]\n", 3, 8, "inside a list"),
    (HEAD + "seed 1\nseed 2\n", 4, 1, "duplicate key 'seed'"),
    (HEAD + "seeds 1\n", 3, 1, "unknown top-level key 'seeds'"),
    (HEAD + "name 'x'\n", 3, 6, "unexpected character"),
    (HEAD + "seed 3x\n", 3, 6, "a number must be followed"),
    (HEAD + 'name "a\\qb"\n', 3, 6, "invalid escape"),
    (HEAD + "train [router experts]\n", 3, 15, "expected ']' or ','"),
    (HEAD + "3 4\n", 3, 1, "expected a key"),
    (HEAD + "layers 4..2 { ffn experts=[a] }\n", 3, 8, "empty layer range"),
    (HEAD + "layers all { ffn experts=[a] router=topk(k=3) }\n", 3, 44, "k = 3"),
    (HEAD + "layers all { ffn experts }\n", 3, 18, "expected a value after 'experts'"),
    (HEAD + "layers all { ffn experts=[a, b] }\n", 3, 30, "expert 'b' is not defined"),
    (HEAD + "merge weights(a=-1)\n", 3, 17, "must be at least 0"),
    (HEAD + "output format=mixtrall\n", 3, 15, "expected 'auto', 'native'"),
    (HEAD + "x " + "[" * 70 + "]" * 70 + "\n", 3, 67, "nested"),
    ("moecompose 2\nsources { a = ./x }\n", 1, 12, "newer"),
    ("", 1, 1, "the spec is empty"),
]


@pytest.mark.parametrize(("text", "line", "column", "words"), MALFORMED)
def test_malformed_text_gives_a_located_error_with_a_caret(
    text: str, line: int, column: int, words: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text, file="bad.moe")
    error = info.value
    assert error.location is not None
    assert (error.location.file, error.location.line, error.location.column) == ("bad.moe", line, column)
    assert words in error.message, error.format()
    assert error.format().startswith(f"bad.moe:{line}:{column}: ")
    assert "\n" not in error.format()
    assert error.snippet is not None
    source_line, caret_line = error.snippet.splitlines()
    assert source_line.startswith(f" {line} | ")
    assert caret_line.endswith("^") and len(caret_line) == len(f" {line} | ") + column
    for leak in ("lark", "Token(", "Unexpected", "Traceback", "__ANON", "RSQB", "_NL"):
        assert leak not in error.format() + error.snippet


def test_cli_prints_one_error_line_off_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "bad.moe"
    path.write_text(HEAD + "layers all { ffn experts=[a] router=topk(k=3) }\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [result.output.splitlines()[0]]
    assert result.output.startswith(f"error: {path}:3:44: k = 3")
    assert "Traceback" not in result.output


def test_cli_on_a_terminal_adds_the_line_and_a_caret(tmp_path: Path, terminal: None) -> None:
    path = tmp_path / "bad.moe"
    path.write_text(HEAD + "layers all { ffn experts=[a] router=topk(k=3) }\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    lines = result.output.splitlines()
    assert lines[0].startswith(f"error: {path}:3:44: k = 3")
    assert lines[1].startswith(" 3 | layers all") and lines[2].endswith("^")


def test_errors_from_reading_sources_point_into_the_moe_file(
    tmp_path: Path, sources: dict[str, Path], terminal: None
) -> None:
    path = tmp_path / "spec.moe"
    path.write_text(f"moecompose 1\nsources {{\n  seed = {sources['seed']}\n  gone = ./nowhere\n}}\n"
                    "layers all { ffn experts=[seed, gone] }\n")
    with pytest.raises(mc.MoeComposeError) as info:
        mc.validate(path)
    assert info.value.location is not None
    assert (info.value.location.line, info.value.location.column) == (4, 10)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and " 4 |   gone = ./nowhere" in result.output


def test_router_k_written_or_default_is_known_to_the_checks() -> None:
    with pytest.raises(SpecError, match="the default router k = 2"):
        parse_spec(HEAD + "layers all { ffn experts=[a] }\n", file="s.moe")
    with pytest.raises(SpecError, match=r"^s\.moe:3:42: k = 2"):
        parse_spec(HEAD + "layers all { ffn experts=[a] router=topk(2) }\n", file="s.moe")
