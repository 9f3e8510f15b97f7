"""`moecompose train`: a recipe trains a built artifact into a new artifact, resumably."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, REPO, SPECS, changed, weights, write_recipe
from safetensors.torch import load_file

import moecompose
from moecompose.artifact import read_plan, sha256_file, verify_files
from moecompose.errors import DataError, MoeComposeError, ResourceError, SpecError
from moecompose.training import loop
from moecompose.training.recipe import load_recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled specs built once: name -> artifact."""
    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[str, Path] = {}

    class Built(dict):
        def __missing__(self, name: str) -> Path:
            path = root / name
            moecompose.build(SPECS / f"{name}.yaml", path)
            self[name] = path
            return path

    return Built(cache)


# ------------------------------------------------------------------------- the run


@pytest.mark.slow
def test_training_lowers_held_out_loss_and_writes_a_verifiable_artifact(
        built: dict[str, Path], tmp_path: Path) -> None:
    base = built["demo"]
    recipe = write_recipe(tmp_path, base, steps=30)
    result = moecompose.train(recipe, tmp_path / "trained")
    out = result.artifact.path
    for domain in ("code", "legal"):
        assert result.final_eval[domain] < result.initial_eval[domain] - 0.5
    assert verify_files(out) == []
    plan = read_plan(out)
    assert plan.format == read_plan(base).format == "mixtral"
    step = plan.derivations[-1]
    assert step["operation"] == "train" and step["steps"] == 30 and step["tokens"] == 30 * 512
    assert step["from_plan_digest"] == read_plan(base).digest()
    assert set(step["data"]) == {"code", "legal"} and step["recipe"]["sequence_length"] == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["derived_from"]["from_manifest_sha256"] == sha256_file(base / "manifest.json")
    # Every tensor trained (the artifact's trainable set is everything) and is the final
    # checkpoint's value; the log has a line per step.
    before, after = weights(base), weights(out)
    assert changed(before, after) == set(before)
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "train"] == list(range(1, 31))
    assert [e["step"] for e in log if e["event"] == "eval"] == [0, 30]


@pytest.mark.slow
def test_trained_export_loads_in_transformers_with_our_logits(
        built: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = moecompose.train(write_recipe(tmp_path, built["demo"], steps=3),
                           tmp_path / "trained").artifact.path
    ids = torch.randint(4, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    ours = moecompose.load(out)(ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_diff_and_inspect_say_trained_from(built: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from moecompose.cli import main

    base = built["demo"]
    out = moecompose.train(write_recipe(tmp_path, base, steps=2), tmp_path / "trained").artifact.path
    result = CliRunner().invoke(main, ["diff", str(base), str(out)])
    assert result.exit_code == 1
    assert "B trained from A: 2 steps, 1,024 tokens" in result.output
    assert moecompose.diff(base, out).plan.lineage.startswith("B trained from A: 2 steps")
    shown = CliRunner().invoke(main, ["inspect", str(out), "--verify"])
    assert shown.exit_code == 0 and f"trained from {base}: 2 steps" in shown.output


def test_resume_continues_bit_identically(built: dict[str, Path], tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    extra = "checkpoint: {every: 2}\neval: {every: 3, max_tokens: 512}\n"
    whole = moecompose.train(write_recipe(tmp_path, base, extra, steps=6, name="a.yaml"),
                             tmp_path / "whole")
    recipe = load_recipe(write_recipe(tmp_path, base, extra, steps=6, name="b.yaml"))

    class Crash(Exception):
        pass

    def crash_after_step_3(event: dict) -> None:
        if event["event"] == "train" and event["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        loop.train(recipe, tmp_path / "resumed", on_event=crash_after_step_3)
    assert not (tmp_path / "resumed").exists()
    resumed = moecompose.train(tmp_path / "b.yaml", tmp_path / "resumed", resume=True)
    a, b = weights(whole.artifact.path), weights(resumed.artifact.path)
    assert changed(a, b) == set()
    assert resumed.final_eval == whole.final_eval
    log = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "train"] == list(range(1, 7))


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_weights(
        built: dict[str, Path], tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    extra = "checkpoint: {every: 3}\n"
    whole = moecompose.train(write_recipe(tmp_path, base, extra, steps=40, name="a.yaml"),
                             tmp_path / "whole")
    recipe = write_recipe(tmp_path, base, extra, steps=40, name="b.yaml")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "moecompose.cli", "train", str(recipe),
                             "-o", str(out), "-q"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = tmp_path / "killed.run" / "checkpoints" / "step-000003"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    resumed = moecompose.train(recipe, out, resume=True)
    assert changed(weights(whole.artifact.path), weights(resumed.artifact.path)) == set()


def test_router_only_recipe_changes_only_router_tensors(built: dict[str, Path],
                                                        tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    out = moecompose.train(write_recipe(tmp_path, base, "train: [router]\n", steps=3),
                           tmp_path / "trained").artifact.path
    before, after = weights(base), weights(out)
    routers = {t.name for t in read_plan(base).tensors if t.group == "router"}
    assert routers and changed(before, after) == routers


def test_pesc_trains_adapters_and_router_only(built: dict[str, Path], tmp_path: Path) -> None:
    base = built["pesc"]
    out = moecompose.train(write_recipe(tmp_path, base, steps=3), tmp_path / "trained").artifact.path
    before, after = weights(base), weights(out)
    groups = {t.name: t.group for t in read_plan(base).tensors}
    assert changed(before, after) == {n for n, g in groups.items() if g in ("router", "adapters")}


@pytest.mark.slow
def test_nexus_extend_train_extend(built: dict[str, Path], tmp_path: Path) -> None:
    nexus = built["nexus"]
    extended = moecompose.extend(nexus, tmp_path / "ext", expert="base", source=SPECS / "dense/base",
                                 domain_texts=str(CORPUS / "code/*.txt")).path
    trained = moecompose.train(write_recipe(tmp_path, extended, steps=2), tmp_path / "trained")
    again = moecompose.extend(trained.artifact.path, tmp_path / "ext2", expert="more",
                              source=SPECS / "dense/law", domain_texts=str(CORPUS / "legal/*.txt"))
    plan = read_plan(again.path)
    assert [d["operation"] for d in plan.derivations] == ["extend", "train", "extend"]
    assert verify_files(again.path) == []
    model = moecompose.load(again.path)
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.slow
def test_mixture_of_tokens_train_transition_train(built: dict[str, Path], tmp_path: Path) -> None:
    mot = built["mixture_of_tokens"]
    first = moecompose.train(write_recipe(tmp_path, mot, steps=2, name="a.yaml"), tmp_path / "t1")
    from moecompose.derive import transition

    top1 = transition(first.artifact.path, tmp_path / "top1")
    second = moecompose.train(write_recipe(tmp_path, top1, steps=2, name="b.yaml"), tmp_path / "t2")
    plan = read_plan(second.artifact.path)
    assert [d["operation"] for d in plan.derivations] == ["train", "transition", "train"]
    assert verify_files(second.artifact.path) == []


def test_bf16_training_keeps_fp32_master_weights(built: dict[str, Path], tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    result = moecompose.train(write_recipe(tmp_path, base, "precision: bf16\n", steps=2),
                              tmp_path / "trained")
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log if e["event"] == "train")
    checkpoint = load_file(next((result.run_dir / "checkpoints").iterdir()) / "model.safetensors")
    assert checkpoint and {t.dtype for t in checkpoint.values()} == {torch.float32}


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
        built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = built["sparse_upcycling"]
    recipe = load_recipe(write_recipe(tmp_path, base, "checkpoint: {every: 1}\n", steps=3))
    real = loop.save_state

    def full_on_step_2(folder: Path, *args: object) -> None:
        real(folder, *args)
        if ".step-000002" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(loop, "save_state", full_on_step_2)
    with pytest.raises(ResourceError, match="No space left"):
        loop.train(recipe, tmp_path / "trained")
    checkpoints = tmp_path / "trained.run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"]
    assert (checkpoints / "step-000001" / "state.json").is_file()
    assert not (tmp_path / "trained").exists()


def test_a_second_run_into_the_same_run_folder_needs_resume_or_force(
        built: dict[str, Path], tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    recipe = write_recipe(tmp_path, base, steps=1)
    moecompose.train(recipe, tmp_path / "trained")
    with pytest.raises(MoeComposeError, match="exists"):
        moecompose.train(recipe, tmp_path / "trained")
    with pytest.raises(MoeComposeError, match="--resume"):
        moecompose.train(recipe, tmp_path / "other", run_dir=tmp_path / "trained.run")
    moecompose.train(recipe, tmp_path / "trained", force=True)


# ------------------------------------------------------------------------ bad input


BAD_RECIPES = [
    ("typo", "stepz: 3\n", SpecError, r"recipe\.yaml:\d+:1: unknown top-level key 'stepz'"),
    ("no match", "data: {code: {files: [nothing/*.txt]}}\n", DataError, "nothing/\\*.txt"),
    ("long", "sequence_length: 1024\nbatch_tokens: 1024\n", SpecError,
     r"recipe\.yaml:\d+:\d+: sequence_length 1024 is longer than the model's 512 positions"),
    ("precision", "precision: fp8\n", SpecError, "expected 'fp32' or 'bf16'"),
    ("train group", "train: [routers]\n", SpecError, "did you mean 'router'"),
]


@pytest.mark.parametrize("case", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipes_are_located_errors(case: tuple, built: dict[str, Path], tmp_path: Path) -> None:
    _, override, kind, message = case
    path = write_recipe(tmp_path, built["sparse_upcycling"], override)
    with pytest.raises(kind, match=message):
        loop.prepare(load_recipe(path))
    assert not (tmp_path / "out").exists()


def test_empty_data_is_a_located_error(built: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    path = write_recipe(tmp_path, built["sparse_upcycling"])
    path.write_text(path.read_text().replace(f"{CORPUS}/legal/*.txt", str(tmp_path / "empty.txt")))
    with pytest.raises(DataError, match="legal"):
        loop.prepare(load_recipe(path))


def test_an_artifact_without_tokenizer_is_named(built: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "no-tokenizer"
    shutil.copytree(built["sparse_upcycling"], copy)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    with pytest.raises(DataError, match="no-tokenizer"):
        loop.prepare(load_recipe(write_recipe(tmp_path, copy)))


def test_a_missing_artifact_is_located(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tmp_path / "nowhere")
    with pytest.raises(SpecError, match=r"recipe\.yaml:2:11: artifact: .*nowhere is not a moecompose artifact"):
        loop.prepare(load_recipe(path))


def test_cli_train_dry_run_prints_the_plan_and_writes_nothing(
        built: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from moecompose.cli import main

    recipe = write_recipe(tmp_path, built["pesc"])
    result = CliRunner().invoke(main, ["train", str(recipe), "-o", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "12 steps x 8 sequences = 6.14K tokens" in result.output
    assert "adapters" in result.output and "router" in result.output and "frozen" in result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tmp_path, "schedule: {warmup_steps: 4, min_lr_ratio: 0.1}\n",
                                      steps=20))
    lrs = [loop.lr_at(s, recipe) for s in range(20)]
    assert lrs[:4] == pytest.approx([3e-3 * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[4] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


# ------------------------------------------------------------------ bundled recipes


RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_bundled_recipe_runs_a_bf16_step_on_its_bundled_artifact(
        name: str, built: dict[str, Path], tmp_path: Path) -> None:
    """Every recipe in recipes/ names a bundled spec's artifact (the top-1 fine-tune: a
    transitioned Mixture-of-Tokens model) and trains it: here one bf16 autocast step, with
    finite losses and fp32 master weights."""
    import yaml

    from moecompose.derive import transition
    from moecompose.training.recipe import parse_recipe

    folder = REPO / "recipes"
    data = yaml.safe_load((folder / f"{name}.yaml").read_text())
    spec = Path(data["artifact"]).name
    if name == "mixture_of_tokens_top1":
        artifact = transition(built["mixture_of_tokens"], tmp_path / "top1")
    else:
        artifact = built[{"mot": "mixture_of_tokens"}.get(spec, spec)]
    data.update(artifact=str(artifact), steps=1, precision="bf16", sequence_length=64,
                batch_tokens=512, eval={"max_tokens": 512}, checkpoint={})
    recipe = parse_recipe(yaml.safe_dump(data), file=f"{name}.yaml", base_dir=folder)
    result = loop.train(recipe, tmp_path / "trained")
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if e["event"] == "train"]
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = load_file(next((result.run_dir / "checkpoints").iterdir()) / "model.safetensors")
    assert checkpoint and {t.dtype for t in checkpoint.values()} == {torch.float32}
    assert verify_files(result.artifact.path) == []


def test_docs_list_every_recipe_key() -> None:
    from pydantic import BaseModel

    from moecompose.training.recipe import DomainData, Recipe

    doc = (REPO / "docs" / "training.md").read_text()
    keys = []
    for name, field in Recipe.model_fields.items():
        tp = field.annotation
        if name == "data":
            keys += [f"data.NAME.{k}" for k in DomainData.model_fields]
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            keys += [f"{name}.{k}" for k in tp.model_fields]
        else:
            keys.append(name)
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert missing == []


# ----------------------------------------------------------------------------- eval


def test_cli_eval_prints_json_and_writes_plots(built: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from moecompose.cli import main

    base = built["sparse_upcycling"]
    recipe = write_recipe(tmp_path, base, steps=2)
    trained = moecompose.train(recipe, tmp_path / "trained")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(base), str(trained.artifact.path),
                                  "--recipe", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [Path(r["artifact"]).name for r in data] == ["sparse_upcycling", "trained"]
    after = {d: v["loss"] for d, v in data[1]["domains"].items()}
    assert after == pytest.approx(trained.final_eval, rel=1e-5)  # the recipe's held-out split
    plots = tmp_path / "plots"
    result = runner.invoke(main, ["eval", str(trained.artifact.path), "--data",
                                  f"code={CORPUS}/code/heapq.py.txt", "--plot", str(plots),
                                  "--log", str(trained.run_dir / "metrics.jsonl")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in plots.iterdir()) == ["loss-curves.png", "usage-1-trained.png"]


@pytest.mark.parametrize("args, message", [
    ([], "give --data NAME=GLOB"),
    (["--data", "code"], "expected NAME=GLOB"),
    (["--data", "code=nothing/*.txt"], "nothing/*.txt"),
])
def test_cli_eval_bad_data_is_one_line(args: list[str], message: str, built: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from moecompose.cli import main

    result = CliRunner().invoke(main, ["eval", str(built["sparse_upcycling"]), *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_training_follows_eager(built: dict[str, Path], tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    runs = {}
    for mode in ("false", "true"):
        result = moecompose.train(write_recipe(tmp_path, base, f"compile: {mode}\n", steps=3,
                                               name=f"{mode}.yaml"), tmp_path / mode)
        log = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        runs[mode] = [json.loads(line)["loss"] for line in log if '"train"' in line]
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)


def test_resume_with_another_recipe_is_refused_and_keeps_the_run(built: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    base = built["sparse_upcycling"]
    first = write_recipe(tmp_path, base, "checkpoint: {every: 1}\n", steps=2, name="a.yaml")
    result = moecompose.train(first, tmp_path / "trained")
    saved = (result.run_dir / "recipe.yaml").read_text()
    other = write_recipe(tmp_path, base, "checkpoint: {every: 1}\n", steps=3, name="b.yaml")
    with pytest.raises(MoeComposeError, match="belongs to another recipe"):
        moecompose.train(other, tmp_path / "again", run_dir=result.run_dir, resume=True)
    assert (result.run_dir / "recipe.yaml").read_text() == saved
