"""Every artifact describes itself truly: its spec.yaml validates as saved, and a derived
artifact's plan.json (transition, extend) is the plan of the model it holds."""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import IDS, weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moecompose
from moecompose.cli import main
from moecompose.derive import transition
from moecompose.dtypes import CODES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "specs").glob("*.yaml"))
TOP1 = {"kind": "topk", "k": 1, "normalize": True, "init": "random", "init_std": 0.02}

MOT = """
moecompose: 1
sources: {base: $base}
layers:
  - select: {from: 1, to: 4}
    ffn:
      experts: {copy: base, count: 4, drop: 0.5}
      router: {kind: token_mixing, group_size: 2, temperature: 0.7, learn_temperature: $learn}
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def stored(artifact: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype) as the artifact's safetensors files hold them."""
    out = {}
    for file in artifact.glob("*.safetensors"):
        if file.name == "domains.safetensors":
            continue
        with safe_open(file, "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = fh.get_slice(name)
                out[name] = (t.get_shape(), t.get_dtype())
    return out


def read_plan(artifact: Path) -> dict:
    return json.loads((artifact / "plan.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECOMPOSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module", params=BUNDLED, ids=lambda p: p.stem)
def bundled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each bundled spec (written against specs/dense/), built once."""
    out = tmp_path_factory.mktemp("bundled") / request.param.stem
    return moecompose.build(request.param, out).path


def test_bundled_artifact_spec_validates_as_saved(bundled: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    saved = yaml.safe_load((bundled / "spec.yaml").read_text())
    assert saved == read_plan(bundled)["spec"]
    moved = tmp_path / "moved"
    shutil.copytree(bundled, moved)
    monkeypatch.chdir(tmp_path)
    moecompose.validate(moved / "spec.yaml")
    result = invoke("validate", str(moved / "spec.yaml"))
    assert result.exit_code == 0, result.output
    for domain in (saved.get("domains") or {}).values():
        assert all(Path(domain[k]).is_absolute() for k in ("texts", "embedding") if k in domain)


# -------------------------------------------------------------------------- transition


@pytest.fixture(scope="module")
def mot(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Mixture-of-Tokens artifact (T = 0.7) built from a copy of the seed that is then
    deleted, and its transition: the sources must not be needed."""
    root = tmp_path_factory.mktemp("mot")
    base = root / "dense"
    shutil.copytree(sources["seed"], base)
    spec = root / "mot.yaml"
    spec.write_text(string.Template(MOT).substitute(base=base, learn="false"))
    built = moecompose.build(spec, root / "mot").path
    base.rename(root / "away")
    new = transition(built, root / "top1")
    (root / "away").rename(base)  # back for the spec file's plan (diff)
    return {"spec": spec, "built": built, "new": new}


def test_transition_plan_lists_the_tensors_it_stores(mot: dict[str, Path]) -> None:
    plan = read_plan(mot["new"])
    tensors = {t["name"]: (t["shape"], CODES[t["dtype"]]) for t in plan["tensors"]}
    assert tensors == stored(mot["new"])
    old, new = weights(mot["built"]), weights(mot["new"])
    for t in plan["tensors"]:
        name = t["name"]
        if name.endswith("mlp.router.weight"):
            assert t["recipe"] == {"op": "copy", "inputs": [f"@base:{name}"], "scale": 1 / 0.7}
            torch.testing.assert_close(new[name], old[name] / 0.7, rtol=1e-6, atol=0)
        else:
            assert t["recipe"] == {"op": "copy", "inputs": [f"@base:{name}"]}
            assert torch.equal(new[name], old[name]), name
    assert plan["sources"]["@base"]["path"] == str(mot["built"])
    assert plan["derivations"][-1]["operation"] == "transition"
    assert plan["derivations"][-1]["layers"] == [1, 2, 3]


def test_transition_plan_is_the_plan_of_its_spec(mot: dict[str, Path]) -> None:
    plan = read_plan(mot["new"])
    assert plan["spec"] == yaml.safe_load((mot["new"] / "spec.yaml").read_text())
    assert plan["spec"]["layers"][0]["ffn"]["router"] == TOP1
    assert plan["spec"]["output"]["format"] == "native"
    assert [row.get("router") for row in plan["layers"]] == [None] + ["topk k=1"] * 3
    assert plan["config"] == json.loads((mot["new"] / "config.json").read_text())
    fresh = moecompose.plan(mot["new"] / "spec.yaml")  # the spec as saved, planned anew
    assert plan["spec"] == fresh.spec
    assert plan["layers"] == list(fresh.layers)
    assert plan["config"] == fresh.config
    assert plan["totals"] == fresh.to_data()["totals"]
    assert [(t["name"], t["shape"], t["trainable"]) for t in plan["tensors"]] == [
        (t.name, list(t.shape), t.trainable) for t in fresh.tensors
    ]
    old = read_plan(mot["built"])
    assert plan["totals"]["active_params"] < old["totals"]["active_params"]
    assert plan["totals"]["params"] == old["totals"]["params"]


def test_transitioned_artifact_loads_verifies_and_inspects_as_topk(mot: dict[str, Path]) -> None:
    model = moecompose.load(mot["new"])
    config = moecompose.load(mot["built"]).transition_to_topk()
    assert model.config.to_dict() == config
    with torch.no_grad():
        assert torch.isfinite(model(IDS[:1]).logits).all()
    result = invoke("inspect", str(mot["new"]), "--verify")
    assert result.exit_code == 0, result.output
    assert "topk k=1" in result.output and "token mixing" not in result.output
    assert "all files match manifest.json" in result.output
    moecompose.validate(mot["new"] / "spec.yaml")


@pytest.mark.parametrize("side", ["artifact", "spec"])
def test_diff_names_the_router_change_of_a_transition(mot: dict[str, Path], side: str) -> None:
    a = mot["built"] if side == "artifact" else mot["spec"]
    result = moecompose.diff(a, mot["new"])
    routers = [c for c in result.changes if c.path.startswith("ffn.router")]
    assert [(c.layers, c.old["kind"], c.new) for c in routers] == [
        ((1, 2, 3), "token_mixing", TOP1)
    ]
    assert result.plan is not None and result.plan.delta("active_params") < 0
    # Tensors copied from the artifact compare as what made them there: only routers differ.
    assert {c.name for c in result.plan.changed} == {
        f"model.layers.{i}.mlp.router.weight" for i in (1, 2, 3)
    }
    cli = invoke("diff", str(a), str(mot["new"]))
    assert cli.exit_code == 1
    assert "ffn.router" in cli.output and "token_mixing" in cli.output and "topk" in cli.output


def test_transition_scales_by_a_learned_temperature_and_drops_it(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    spec = tmp_path / "mot.yaml"
    spec.write_text(string.Template(MOT).substitute(base=sources["seed"], learn="true"))
    built = moecompose.build(spec, tmp_path / "mot").path
    state = load_file(built / "model.safetensors")
    state["model.layers.2.mlp.router.temperature"] = torch.tensor(0.5)  # as if trained
    save_file(state, built / "model.safetensors", metadata={"format": "pt"})
    new = transition(built, tmp_path / "top1")
    plan = read_plan(new)
    names = {t["name"] for t in plan["tensors"]}
    assert not any(name.endswith("router.temperature") for name in names)
    assert names == set(stored(new))
    router = {t["name"]: t["recipe"] for t in plan["tensors"]}
    assert router["model.layers.2.mlp.router.weight"]["scale"] == 2.0
    assert router["model.layers.1.mlp.router.weight"]["scale"] == pytest.approx(1 / 0.7)
    sparse = weights(new)
    torch.testing.assert_close(sparse["model.layers.2.mlp.router.weight"],
                               state["model.layers.2.mlp.router.weight"] * 2, rtol=0, atol=0)
    assert moecompose.load(new).config.trainable is None


# ------------------------------------------------------------------------ nexus paths


NEXUS = """
moecompose: 1
sources: {seed: $seed, code: $code, law: $law}
embed_with: seed
domains:
  code: {texts: ./data/code/*.txt}
  law: {embedding: ./emb/law.safetensors}
layers:
  - select: {from: 1, to: 4}
    ffn:
      shared: seed
      experts: [code, law]
      router: {kind: nexus}
"""


def test_nexus_and_extended_specs_validate_with_absolute_domain_paths(
    write_spec, tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, words in (("code", "def return import class"), ("math", "sum proof number")):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "doc.txt").write_text(words)
    (tmp_path / "emb").mkdir()
    save_file({"v": torch.randn(64)}, tmp_path / "emb" / "law.safetensors")
    spec = write_spec(NEXUS)
    built = moecompose.build(spec, tmp_path / "out").path
    saved = moecompose.load_spec(built / "spec.yaml")
    assert saved.domains["code"].texts == str(tmp_path.resolve() / "data/code/*.txt")
    assert saved.domains["law"].embedding == str(tmp_path.resolve() / "emb/law.safetensors")
    monkeypatch.chdir(ROOT)
    moecompose.validate(built / "spec.yaml")
    assert moecompose.diff(spec, built).equal
    # Without readable sources the specs are compared as written: paths made absolute.
    missing = write_spec(NEXUS.replace("$seed", str(tmp_path / "gone")), "missing.yaml")
    result = moecompose.diff(missing, built)
    assert result.plan is None
    assert not [c.path for c in result.changes if c.path.startswith("domains")]

    extended = moecompose.extend(built, tmp_path / "ext", expert="math", source=sources["math"],
                                 domain_texts=str(tmp_path / "data/math/*.txt")).path
    moecompose.validate(extended / "spec.yaml")
    assert read_plan(extended)["spec"] == yaml.safe_load((extended / "spec.yaml").read_text())
    assert set(read_plan(extended)["spec"]["domains"]) == {"code", "law", "math"}


@pytest.mark.parametrize(("spec", "kind"), [("pesc", "adapter experts (PESC)"),
                                            ("sparse_upcycling", "copied experts")])
def test_extend_names_the_expert_kind_it_cannot_add_to(
    spec: str, kind: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    built = moecompose.build(ROOT / "specs" / f"{spec}.yaml", tmp_path / spec).path
    with pytest.raises(moecompose.SpecError, match=rf"layer rule 0 has {re.escape(kind)};"):
        moecompose.extend(built, tmp_path / "ext", expert="math", source=sources["math"],
                          prompts=["sum proof number"])
    assert not (tmp_path / "ext").exists()
