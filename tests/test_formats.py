"""Output formats are one module each (``moecompose/formats``): the registry is the
package's modules, each format reads back what it writes, the reasons a format refuses a
model are those users have always seen, and a new format is one new file."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import moecompose as mc
from moecompose import formats
from moecompose.errors import SpecError
from moecompose.formats import MoEShape
from moecompose.model import MoECausalLM
from moecompose.model.config import ModelConfig
from moecompose.plan.recipe import Plan, Recipe

ROOT = Path(__file__).resolve().parent.parent
CASES = [(p, {}) for p in sorted((ROOT / "specs").glob("*.yaml"))] + [
    (ROOT / "specs" / "demo.yaml", {"layers[0].ffn.shared": "seed"}),  # Qwen2-MoE, not baked
]


def test_registry_is_the_modules_of_the_package() -> None:
    modules = {m.name for m in pkgutil.iter_modules(formats.__path__)}
    assert set(formats.names()) == modules
    assert formats.names() == ("native", "mixtral", "qwen2_moe", "qwen3_moe")  # native, then auto's order
    for name in formats.names():
        fmt = formats.get(name)
        assert fmt.name == name
        assert formats.by_model_type(fmt.model_type) is fmt


def test_format_modules_import_no_torch() -> None:
    code = ("import sys; from moecompose import formats; formats.registry(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _values(plan: Plan, ids: dict[str, float]) -> dict[str, torch.Tensor]:
    """A stand-in for each planned tensor: a number per recipe (a stack: its parts' rows),
    so that tensors made alike hold the same values whatever their names."""

    def value(recipe: Recipe, shape: tuple[int, ...]) -> torch.Tensor:
        if recipe.op == "stack":
            return torch.stack([value(part, shape[1:]) for part in recipe.parts])
        data = recipe.to_data()
        data.pop("scale", None)  # (Qwen2-MoE doubles its gated shared expert's down-projection)
        key = json.dumps(data, sort_keys=True)
        return torch.full(shape, ids.setdefault(key, float(len(ids))))

    return {t.name: value(t.recipe, t.shape) for t in plan.tensors}


def _read_back(plan: Plan) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, float]]:
    fmt = formats.get(plan.format)
    data = fmt.read_config(plan.config)
    assert data is not None
    config = ModelConfig.from_dict(data)
    ids: dict[str, float] = {}
    return config, fmt.read_tensors(config, _values(plan, ids)), ids


def _plans(path: Path, change: dict[str, Any]) -> dict[str, Plan]:
    """The spec's plan in every format that expresses it."""
    spec = mc.load_spec(path).with_(change)
    plans = {}
    for name in formats.names():
        try:
            plans[name] = mc.plan(spec.with_({"output.format": name}))
        except SpecError:
            continue
    return plans


@pytest.mark.parametrize(("path", "change"), CASES,
                         ids=[p.stem + ("+shared" if c else "") for p, c in CASES])
def test_each_format_reads_back_what_it_writes(path: Path, change: dict[str, Any]) -> None:
    """For every format that expresses the spec: the config reads back to the native config
    it was written from; the tensors read back under the names and shapes of the model that
    config describes, holding what the native plan puts under those names (experts stacked
    in order)."""
    plans = _plans(path, change)
    for name, plan in plans.items():
        config, tensors, ids = _read_back(plan)
        initializer_range = plan.config.get("initializer_range", 0.02)
        assert formats.get(name).write_config(config, initializer_range) == plan.config
        with torch.device("meta"):
            model = MoECausalLM.from_config(config)
        assert {n: tuple(t.shape) for n, t in tensors.items()} == {
            n: tuple(t.shape) for n, t in model.state_dict().items()}
        expected = _values(plans["native"], ids)
        common = set(tensors) & set(expected)
        assert {n for n in expected if ".experts." in n} <= common
        for n in common:
            assert torch.equal(tensors[n], expected[n]), (name, n)


def test_the_cases_read_back_every_format() -> None:
    """Every format but Qwen3-MoE, which needs Qwen3 sources: tests/test_families.py reads
    its exports back (moecompose.load against transformers)."""
    covered = set().union(*(_plans(path, change) for path, change in CASES))
    assert covered == set(formats.names()) - {"qwen3_moe"}


# Each reason, as test_spec_errors.py shows them in context: the texts users see.
ALL_BLOCKED = MoEShape(
    moe_layers=(), dense_layers=(0, 1, 3), num_experts=frozenset({2, 3}),
    top_k=frozenset({1, 2}), normalize=frozenset({True, False}), shared=frozenset({True, False}),
    unexpressible=frozenset({"adapters", "token_mixing", "nexus"}), attention_layers=(0, 1),
    block="parallel",
)
HF_REASONS = [
    "adapter experts",
    "the nexus router (format: qwen2_moe bakes it into a linear gate)",
    "token mixing",
    "attention experts (layers 0-1)",
    "block: parallel",
    "no layer is MoE",
    "MoE layers have different expert counts",
    "MoE layers have different k",
]


@pytest.mark.parametrize(("name", "reasons"), [
    ("native", []),
    ("mixtral", [*HF_REASONS,
                 "layers 0-1, 3 stay dense (Mixtral makes every layer MoE)",
                 "a shared expert (Mixtral has none)",
                 "router.normalize: false (Mixtral renormalises the top-k weights)",
                 "per-head q/k norms (Qwen3 attention: format qwen3_moe has them)",
                 "q/k/v biases (Mixtral attention has none)"]),
    ("qwen2_moe", [*HF_REASONS,
                   "sliding-window attention (window 4; Qwen2-MoE windows only some layers)",
                   "per-head q/k norms (Qwen3 attention: format qwen3_moe has them)",
                   "MoE layers without a shared expert (Qwen2-MoE always has one)",
                   "MoE layers differ in router.normalize"]),
    ("qwen3_moe", [*HF_REASONS,
                   "sliding-window attention (window 4)",
                   "a shared expert (Qwen3-MoE has none)",
                   "MoE layers differ in router.normalize"]),
], ids=["native", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_blocker_texts_are_the_ones_users_see(name: str, reasons: list[str]) -> None:
    """Every reason of each format, in order; asked for by name, Qwen2-MoE expresses a nexus
    router (baked into its gate)."""
    arch: Any = SimpleNamespace(attention_bias=True, sliding_window=4, qk_norm="head",
                                norm_placement="pre", hidden_act="silu", head_dim=8,
                                norm_unit_offset=False, scale_embeddings=False,
                                query_pre_attn_scalar=None, attn_logit_softcapping=None,
                                final_logit_softcapping=None, layer_types=None,
                                rope_local_base_freq=None)
    assert formats.get(name).blockers(arch, ALL_BLOCKED, asked=False) == reasons
    baked = [r for r in reasons if not (name == "qwen2_moe" and r.startswith("the nexus"))]
    assert formats.get(name).blockers(arch, ALL_BLOCKED, asked=True) == baked


TOY = '''
"""A format that exists only in this test: Mixtral's rules under other names."""
from moecompose.formats import Format, Layout, embedded_native, hf_config, mixtral, moe_ffns

LAYOUT = Layout.of("model.layers.{i}.toy", router="router.weight",
                   experts="experts.{j}.{name}.weight", projections=("gate", "up", "down"))


def write_config(native_config, initializer_range):
    moe, router = moe_ffns(native_config)
    return hf_config(native_config, initializer_range, architecture="ToyForCausalLM",
                     model_type="toy_moe", num_experts=moe[0].num_experts, top_k=router.k)


FORMAT = Format(
    name="toy", model_type="toy_moe", auto=0, gates_shared_expert=False, layout=LAYOUT,
    blockers=mixtral.blockers, write_config=write_config, read_config=embedded_native,
)
'''


@pytest.fixture
def toy_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One more file in the formats package (a second folder of it), and nothing else."""
    (tmp_path / "toy.py").write_text(TOY)
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(tmp_path)])
    formats.registry.cache_clear()
    yield
    formats.registry.cache_clear()
    sys.modules.pop("moecompose.formats.toy", None)


def test_a_new_format_is_one_new_file(toy_format: None, tmp_path: Path) -> None:
    assert formats.names() == ("native", "toy", "mixtral", "qwen2_moe", "qwen3_moe")
    spec = mc.load_spec(ROOT / "specs" / "demo.yaml")
    plan = mc.plan(spec)  # format: auto tries toy first
    assert (plan.format, plan.format_reason) == ("toy", "auto: the model is expressible as toy")
    assert plan.config["model_type"] == "toy_moe"
    assert "model.layers.0.toy.experts.2.down.weight" in {t.name for t in plan.tensors}
    toy = mc.load(mc.build(plan, tmp_path / "toy").path).state_dict()
    native = mc.build(spec.with_({"output.format": "native"}), tmp_path / "native").path
    expected = mc.load(native).state_dict()
    assert toy.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(toy[name], tensor), name
