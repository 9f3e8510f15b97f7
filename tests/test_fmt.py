"""`moecompose fmt`: canonical text in either syntax that parses back to the same spec and
keeps the comments of the text it was given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecompose.cli import main
from moecompose.spec import load_spec, parse_spec
from moecompose.spec.formatter import format_dsl, format_spec, format_yaml
from moecompose.spec.schema import Spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "specs").iterdir() if p.suffix in (".yaml", ".moe"))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("syntax", ["yaml", "dsl"])
@pytest.mark.parametrize("full", [False, True])
def test_formatted_text_parses_back_to_the_same_spec(name: str, syntax: str, full: bool) -> None:
    path = ROOT / "specs" / name
    args = ["fmt", str(path), "--to", syntax] + (["--full"] if full else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    again = parse_spec(result.output, syntax=syntax, check=False)
    assert again == load_spec(path, check=False)


def test_canonical_dsl_leaves_defaults_out() -> None:
    spec = load_spec(ROOT / "specs" / "btx.yaml")
    assert format_dsl(spec, comments=False) == (
        "moecompose 1\n"
        "sources {seed = ./dense/seed; code = ./dense/code; law = ./dense/law}\n"
        "layers all {\n"
        "  ffn experts=[seed, code, law]\n"
        "}\n"
        "output format=mixtral\n"
    )
    assert "router: {kind: topk, k: 2" in format_yaml(spec, full=True)
    assert "router" not in format_yaml(spec)


def test_check_passes_on_canonical_text_and_fails_otherwise(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "specs" / "sparse_upcycling.yaml")
    canonical = tmp_path / "s.moe"
    canonical.write_text(format_dsl(spec))
    assert invoke("fmt", str(canonical), "--check").exit_code == 0
    loose = tmp_path / "loose.moe"
    for change in ("moecompose 1\nseed 0\n", "moecompose 1      # aligned\n"):
        loose.write_text(format_dsl(spec).replace("moecompose 1\n", change))
        result = CliRunner().invoke(main, ["fmt", str(loose), "--check"])
        assert result.exit_code == 1 and "not in canonical form" in result.output
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(format_yaml(spec))
    assert invoke("fmt", str(yaml_file), "--check").exit_code == 0
    assert invoke("fmt", str(yaml_file), "--to", "dsl").output == format_dsl(spec)


def test_fmt_of_a_bad_spec_is_one_error_line_and_a_caret(tmp_path: Path, terminal: None) -> None:
    path = tmp_path / "bad.moe"
    path.write_text("moecompose 1\nsources { a = ./x }\nmerge avarage\n")
    result = CliRunner().invoke(main, ["fmt", str(path)])
    assert result.exit_code == 2
    first, *rest = result.output.splitlines()
    assert first.startswith(f"error: {path}:3:7: ") and rest[-1].strip().endswith("^")


# ------------------------------------------------------------------------- comments

COMMENTED_YAML = """\
# header
sources:   # where the experts come from
  seed: ./dense/seed
  code: ./dense/code
moecompose: 1
layers:
  - select: all
    ffn:
      # one expert per source
      experts: [seed, code]     # seed first
# footer
"""

COMMENTED_DSL = """\
# header
sources {seed = ./dense/seed; code = ./dense/code}  # where the experts come from
moecompose 1
layers all {
  # one expert per source
  ffn experts=[seed, code]  # seed first
}
# footer
"""


def fmt_text(text: str, syntax: str, to: str) -> str:
    return format_spec(parse_spec(text, syntax=syntax, check=False), to)


def test_yaml_comments_are_kept_in_yaml() -> None:
    assert fmt_text(COMMENTED_YAML, "yaml", "yaml") == (
        "# header\n"
        "moecompose: 1\n"
        "sources: {seed: ./dense/seed, code: ./dense/code}  # where the experts come from\n"
        "layers:\n"
        "- select: all\n"
        "  ffn:\n"
        "    # one expert per source\n"
        "    experts: [seed, code]  # seed first\n"
        "# footer\n"
    )


def test_dsl_comments_are_kept_in_dsl() -> None:
    loose = COMMENTED_DSL.replace("moecompose 1", "moecompose 1    ").replace("  # seed", "    # seed")
    assert fmt_text(loose, "dsl", "dsl") == (
        "# header\n"
        "moecompose 1\n"
        "sources {seed = ./dense/seed; code = ./dense/code}  # where the experts come from\n"
        "layers all {\n"
        "  # one expert per source\n"
        "  ffn experts=[seed, code]  # seed first\n"
        "}\n"
        "# footer\n"
    )


def test_yaml_comments_move_to_dsl_next_to_their_keys() -> None:
    # `ffn` is written one key per line so the comments on `experts` stay next to it
    assert fmt_text(COMMENTED_YAML, "yaml", "dsl") == (
        "# header\n"
        "moecompose 1\n"
        "sources {seed = ./dense/seed; code = ./dense/code}  # where the experts come from\n"
        "layers all {\n"
        "  ffn {\n"
        "    # one expert per source\n"
        "    experts [seed, code]  # seed first\n"
        "  }\n"
        "}\n"
        "# footer\n"
    )


def test_dsl_comments_move_to_yaml() -> None:
    assert fmt_text(COMMENTED_DSL, "dsl", "yaml") == (
        "# header\n"
        "moecompose: 1\n"
        "sources: {seed: ./dense/seed, code: ./dense/code}  # where the experts come from\n"
        "layers:\n"
        "- select: all\n"
        "  # one expert per source\n"
        "  ffn:  # seed first\n"
        "    experts: [seed, code]\n"
        "# footer\n"
    )


def test_comment_inside_a_one_line_mapping_spreads_it_over_lines() -> None:
    text = "moecompose 1\nsources {\n  seed = ./a  # the seed\n  code = ./b\n}\n"
    assert fmt_text(text, "dsl", "dsl") == text
    assert fmt_text(text, "dsl", "yaml") == (
        "moecompose: 1\nsources:\n  seed: ./a  # the seed\n  code: ./b\n"
    )


@pytest.mark.parametrize("syntax", ["yaml", "dsl"])
def test_hash_inside_quoted_text_is_not_a_comment(syntax: str) -> None:
    text = {
        "yaml": "moecompose: 1\nname: 'a #1'  # real\nsources: {seed: \"./x #2\"}\n",
        "dsl": 'moecompose 1\nname "a #1"  # real\nsources {seed = "./x #2"}\n',
    }[syntax]
    spec = parse_spec(text, syntax=syntax, check=False)
    assert [c.text for c in spec.origin.comments] == ["# real"]
    assert spec.name == "a #1" and spec.sources["seed"] == "./x #2"
    for to in ("yaml", "dsl"):
        out = format_spec(spec, to)
        assert out.count("#") == 3 and out.count("# real") == 1
        assert parse_spec(out, syntax=to, check=False) == spec


def test_yaml_block_scalar_keeps_its_header_comment_outside_the_text() -> None:
    text = "moecompose: 1\nname: |  # note\n  a # b\nsources: {seed: ./x}\n"
    spec = parse_spec(text, check=False)
    assert [c.text for c in spec.origin.comments] == ["# note"]
    for to in ("yaml", "dsl"):
        out = format_spec(spec, to)
        again = parse_spec(out, syntax=to, check=False)
        assert again == spec and [c.text for c in again.origin.comments] == ["# note"]


def test_comment_on_an_omitted_default_moves_to_the_next_key_that_stays() -> None:
    text = (
        "moecompose: 1\n"
        "sources: {seed: ./x}\n"
        "# averaging is the default\n"
        "merge: average  # BTX\n"
        "layers:\n"
        "  - select: all\n"
        "    ffn:\n"
        "      experts: [seed]\n"
        "      router: {kind: topk, k: 2}  # the default router\n"
        "output: {format: auto}  # the default output\n"
    )
    assert fmt_text(text, "yaml", "yaml") == (
        "moecompose: 1\n"
        "sources: {seed: ./x}\n"
        "# averaging is the default\n"
        "# BTX\n"
        "layers:\n"
        "- select: all\n"
        "  ffn:  # the default router\n"
        "    experts: [seed]\n"
        "# the default output\n"
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_bundled_spec_passes_fmt_check(name: str) -> None:
    result = invoke("fmt", str(ROOT / "specs" / name), "--check")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("syntax", ["yaml", "dsl"])
@pytest.mark.parametrize("full", [False, True])
def test_fmt_is_idempotent_and_keeps_every_comment(name: str, syntax: str, full: bool) -> None:
    spec = load_spec(ROOT / "specs" / name, check=False)
    once = format_spec(spec, syntax, full=full)
    again = parse_spec(once, syntax=syntax, check=False)
    assert format_spec(again, syntax, full=full) == once
    assert [c.text for c in again.origin.comments] == [c.text for c in spec.origin.comments]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(EXAMPLES), marks=st.lists(st.tuples(st.integers(0, 40), st.booleans())),
       to=st.sampled_from(["yaml", "dsl"]))
def test_comments_anywhere_are_kept_and_fmt_is_idempotent(
    name: str, marks: list[tuple[int, bool]], to: str
) -> None:
    path = ROOT / "specs" / name
    syntax = "dsl" if path.suffix == ".moe" else "yaml"
    rows = path.read_text().splitlines()
    for n, (at, trailing) in enumerate(marks):
        i = at % (len(rows) + 1)
        if trailing and i < len(rows) and rows[i].strip() and "#" not in rows[i]:
            rows[i] += f"  # c{n}"
        else:
            rows.insert(i, f"# c{n}")
    spec = parse_spec("\n".join(rows) + "\n", syntax=syntax, check=False)
    assert spec == load_spec(path, check=False)
    once = format_spec(spec, to)
    again = parse_spec(once, syntax=to, check=False)
    assert again == spec and format_spec(again, to) == once
    assert sorted(_pieces(again)) == sorted(_pieces(spec))


def _pieces(spec: Spec) -> list[str]:
    """The spec's comments, trailing comments that fmt joined on one line taken apart."""
    return [p for c in spec.origin.comments for p in re.split(r"\s+(?=# )", c.text)]
