"""`moecompose fmt`: canonical text in either syntax that parses back to the same spec."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from moecompose.cli import main
from moecompose.spec import load_spec, parse_spec
from moecompose.spec.formatter import format_dsl, format_yaml

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
    assert format_dsl(spec) == (
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
    loose.write_text(format_dsl(spec).replace("\n", "  # note\n", 1))
    result = CliRunner().invoke(main, ["fmt", str(loose), "--check"])
    assert result.exit_code == 1 and "not in canonical form" in result.output
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(format_yaml(spec))
    assert invoke("fmt", str(yaml_file), "--check").exit_code == 0
    assert invoke("fmt", str(yaml_file), "--to", "dsl").output == format_dsl(spec)


def test_fmt_of_a_bad_spec_is_one_error_line_and_a_caret(tmp_path: Path) -> None:
    path = tmp_path / "bad.moe"
    path.write_text("moecompose 1\nsources { a = ./x }\nmerge avarage\n")
    result = CliRunner().invoke(main, ["fmt", str(path)])
    assert result.exit_code == 2
    first, *rest = result.output.splitlines()
    assert first.startswith(f"error: {path}:3:7: ") and rest[-1].strip().endswith("^")
