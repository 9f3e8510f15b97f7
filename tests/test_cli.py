"""The ``moecompose`` command line: help, validate, plan, build, inspect."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import moecompose as mc
from moecompose.cli import main

BTX = """
moecompose: 1
sources: {seed: $seed, code: $code, law: $law}
merge: average
layers:
  - select: all
    ffn:
      experts: [seed, code, law]
      router: {kind: topk, k: 2}
"""

# Random draws (drop-upcycling, router init) and dense layers: the native format.
UPCYCLE = """
moecompose: 1
seed: 7
sources: {base: $seed}
layers:
  - select: {from: 0, to: 4, every: 2}
    ffn:
      experts: {copy: base, count: 4, drop: 0.5}
      router: {kind: topk, k: 2}
"""

ARTIFACT_FILES = {
    "config.json", "model.safetensors", "plan.json", "spec.yaml", "manifest.json", "README.md",
    "tokenizer.json", "tokenizer_config.json",
}


def _command() -> list[str]:
    exe = shutil.which("moecompose")
    return [exe] if exe else [sys.executable, "-m", "moecompose.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_command(), *args], capture_output=True, text=True, timeout=300)


def invoke(*args: str):  # in-process: fast, for commands that read no weights
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone (it wraps at 80 columns off a terminal)."""
    return " ".join(text.split())


def hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------- help


def test_top_level_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for name in main.commands:
        assert name in result.stdout
    assert "--version" in result.stdout


@pytest.mark.parametrize("command", sorted(main.commands))
def test_subcommand_help_mentions_its_options(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and command in result.output
    for param in main.commands[command].params:
        if isinstance(param, click.Option):
            assert any(opt in result.output for opt in param.opts), (param.opts, result.output)
        elif isinstance(param, click.Argument):
            assert param.human_readable_name in result.output


def test_readme_command_table_lists_every_command() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in main.commands:
        assert f"`moecompose {name}" in readme, name


def test_short_help_flag() -> None:
    assert invoke("-h").exit_code == 0


def test_expected_options_exist() -> None:
    def options(command: str) -> set[str]:
        return {o for p in main.commands[command].params for o in getattr(p, "opts", [])}

    assert {"--json"} <= options("plan")
    assert {"-o", "--output", "--force"} <= options("build")
    assert {"--verify"} <= options("inspect")


# ---------------------------------------------------------------- validate and plan


def test_validate_prints_ok(write_spec) -> None:
    spec = write_spec(BTX)
    result = invoke("validate", str(spec))
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert out.startswith(f"ok {spec}: ")
    assert "3 source(s)" in out and "llama" in out
    assert "4/4 MoE layers" in out


def test_plan_prints_layers_totals_and_normalised_spec(write_spec) -> None:
    spec = write_spec(UPCYCLE)
    result = invoke("plan", str(spec))
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "Layers" in out and "Totals" in out
    assert "MoE" in out and "dense" in out
    assert "parameters" in out and "active parameters / token" in out and "FLOPs" in out
    # the normalised spec shows every default, including ones the spec left out
    for default in ("normalize: true", "aux_loss", "load_balance", "merge: average",
                    "block: sequential", "train: [all]", "dtype: float32", "format: auto"):
        assert default in out, default


def test_plan_tensors_lists_every_tensor(write_spec) -> None:
    spec = write_spec(BTX)
    result = invoke("plan", str(spec), "--tensors")
    assert result.exit_code == 0, result.output
    assert "Tensors" in result.output
    assert "model.embed_tokens.weight" in result.output


def test_plan_json_is_valid_json_with_totals(write_spec) -> None:
    spec = write_spec(BTX)
    result = invoke("plan", str(spec), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    totals = data["totals"]
    assert totals["params"] > totals["active_params"] > 0
    assert totals["flops_per_token"] > 0
    assert data["format"] == "mixtral"
    assert data["spec"]["layers"][0]["ffn"]["router"]["normalize"] is True
    assert data == json.loads(mc.plan(spec).to_json())


def test_schema_is_json() -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "sources" in schema["properties"]


def test_user_error_through_the_real_command(write_spec) -> None:
    spec = write_spec("moecompose: 1\nsorces: {seed: $seed}\n")
    line = one_error_line(run("validate", str(spec)))
    assert line == f"error: {spec}:2:1: unknown top-level key 'sorces' (did you mean 'sources'?)"


# -------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> dict[str, Path]:
    """One artifact built through the command, shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("cli-build")
    spec = root / "upcycle.yaml"
    spec.write_text(UPCYCLE.replace("$seed", str(sources["seed"])).lstrip())
    out = root / "out"
    result = run("build", str(spec), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "built " in flat(result.stdout)
    return {"spec": spec, "out": out}


@pytest.mark.slow
def test_build_writes_the_artifact_layout(built: dict[str, Path]) -> None:
    out = built["out"]
    names = {p.name for p in out.iterdir()}
    assert names >= ARTIFACT_FILES, names
    assert not [n for n in names if "partial" in n]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moecompose"
    plan = json.loads((out / "plan.json").read_text())
    assert {"totals", "tensors", "spec"} <= set(plan)
    assert all({"name", "shape", "dtype", "recipe"} <= set(t) for t in plan["tensors"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert "base" in manifest["sources"]
    assert "moecompose" in manifest["versions"]
    readme = (out / "README.md").read_text()
    assert readme.startswith("# upcycle")
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["layers"][0]["ffn"]["experts"] == {"copy": "base", "count": 4, "drop": 0.5}
    assert spec["output"]["dtype"] == "float32"


@pytest.mark.slow
def test_saved_spec_revalidates(built: dict[str, Path]) -> None:
    saved = built["out"] / "spec.yaml"
    result = invoke("validate", str(saved))
    assert result.exit_code == 0, result.output
    assert flat(result.output).startswith(f"ok {saved}: ")
    assert mc.plan(saved).tensors == mc.plan(built["spec"]).tensors


@pytest.mark.slow
def test_inspect_verify(built: dict[str, Path], tmp_path: Path) -> None:
    result = run("inspect", str(built["out"]), "--verify")
    assert result.returncode == 0, result.stderr
    assert "all files match manifest.json" in flat(result.stdout)

    copy = Path(shutil.copytree(built["out"], tmp_path / "copy"))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    line = one_error_line(run("inspect", str(copy), "--verify"))
    assert "model.safetensors" in line and "manifest.json" in line


CORRUPTIONS = {"garbage": "{not json", "a list": "[]", "nested": "[" * 10_000 + "]" * 10_000}


@pytest.mark.slow
@pytest.mark.parametrize("file", ["plan.json", "config.json", "manifest.json"])
@pytest.mark.parametrize("content", sorted(CORRUPTIONS))
def test_commands_on_a_corrupted_artifact_say_which_file(
    built: dict[str, Path], tmp_path: Path, file: str, content: str
) -> None:
    copy = Path(shutil.copytree(built["out"], tmp_path / "copy"))
    (copy / file).write_text(CORRUPTIONS[content])
    commands = {"plan.json": [["inspect", str(copy)], ["diff", str(copy), str(built["out"])]],
                "config.json": [["transition", str(copy), "-o", str(tmp_path / "t")]],
                "manifest.json": [["inspect", str(copy), "--verify"]]}[file]
    for command in commands:
        line = one_error_line(run(*command))
        assert f"{copy / file} is corrupted" in line or f"{file} is corrupted" in line, line
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_inspect_of_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    line = one_error_line(run("inspect", str(tmp_path)))
    assert "plan.json" in line


@pytest.mark.slow
def test_existing_output_is_refused_and_untouched(built: dict[str, Path]) -> None:
    out = built["out"]
    before = hashes(out)
    line = one_error_line(run("build", str(built["spec"]), "-o", str(out)))
    assert "already exists" in line and "--force" in line
    assert hashes(out) == before


@pytest.mark.slow
def test_rebuild_with_force_is_byte_identical(built: dict[str, Path], tmp_path: Path) -> None:
    first = hashes(built["out"])
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    result = run("build", str(built["spec"]), "-o", str(out), "--force", "-q")
    assert result.returncode == 0, result.stderr
    assert hashes(out) == first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # and once more, in place, through the API
    mc.build(built["spec"], out, force=True)
    assert hashes(out) == first


@pytest.mark.slow
def test_force_never_replaces_a_folder_that_is_not_an_artifact(
    built: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = one_error_line(run("build", str(built["spec"]), "-o", str(out), "--force"))
    assert "not a moecompose artifact" in line
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_build_btx_exports_mixtral(write_spec, tmp_path: Path) -> None:
    spec = write_spec(BTX)
    out = tmp_path / "btx"
    result = run("build", str(spec), "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("built ")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert {p.name for p in out.iterdir()} >= ARTIFACT_FILES
