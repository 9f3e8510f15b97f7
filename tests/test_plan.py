"""The plan: recipes, totals and format choice, from metadata alone."""

from __future__ import annotations

import json

import pytest

import moecompose
from moecompose.plan import Plan
from moecompose.sources.checkpoint import open_checkpoint

BTX = """
moecompose: 1
sources: {seed: $seed, code: $code, law: $law}
layers:
  - select: all
    ffn:
      experts: [seed, code, law]
      router: {kind: topk, k: 2}
"""


def test_plan_totals_count_every_tensor_and_k_of_e_experts(write_spec, sources) -> None:
    plan = moecompose.plan(write_spec(BTX))
    ckpt = open_checkpoint("seed", sources["seed"])
    a = ckpt.arch
    dense_params = sum(e.numel for e in ckpt.tensors.values())
    ffn = 3 * a.hidden_size * a.intermediate_size
    router = 3 * a.hidden_size
    layers = a.num_hidden_layers
    assert plan.totals.params == dense_params + layers * (2 * ffn + router)
    assert plan.totals.active_params == dense_params + layers * (ffn + router)  # 2 of 3 active
    assert plan.totals.params == sum(t.numel for t in plan.tensors)
    assert plan.totals.bytes == 4 * plan.totals.params


def test_k_changes_active_params_and_flops_but_not_params(write_spec) -> None:
    spec = moecompose.load_spec(write_spec(BTX))
    p1 = moecompose.plan(spec.with_({"layers[0].ffn.router.k": 1}))
    p2 = moecompose.plan(spec)
    assert p1.totals.params == p2.totals.params
    per_expert_layer = p2.totals.active_params - p1.totals.active_params
    assert per_expert_layer > 0
    assert p2.totals.flops_per_token - p1.totals.flops_per_token == 2 * per_expert_layer


def test_plan_is_deterministic_and_round_trips_json(write_spec) -> None:
    path = write_spec(BTX)
    a, b = moecompose.plan(path), moecompose.plan(path)
    assert a.to_json() == b.to_json()
    again = Plan.from_data(json.loads(a.to_json()))
    assert again.to_json() == a.to_json()
    assert again.digest() == a.digest()


def test_seed_changes_only_random_recipes(write_spec) -> None:
    spec = moecompose.load_spec(write_spec(BTX))
    a, b = moecompose.plan(spec), moecompose.plan(spec.with_(seed=1))
    changed = {t.name for t, u in zip(a.tensors, b.tensors) if t.recipe != u.recipe}
    assert changed and all("gate.weight" in n for n in changed)


@pytest.mark.parametrize(
    ("extra", "fmt", "reason"),
    [
        ("", "mixtral", "expressible as mixtral"),
        ("      shared: seed\n", "qwen2_moe", "not mixtral: a shared expert"),
        ("      router: {kind: topk, k: 2, normalize: false}\n", "native", "renormalises"),
    ],
)
def test_auto_format_picks_the_first_that_expresses_the_model(write_spec, extra, fmt, reason) -> None:
    text = BTX.replace("      router: {kind: topk, k: 2}\n", "") + extra
    plan = moecompose.plan(write_spec(text))
    assert plan.format == fmt
    assert reason in plan.format_reason


def test_train_marks_only_named_groups_trainable(write_spec) -> None:
    plan = moecompose.plan(write_spec(BTX + "train: [router]\n"))
    trainable = [t.name for t in plan.tensors if t.trainable]
    assert trainable and all(t.endswith("block_sparse_moe.gate.weight") for t in trainable)
    native = [t.replace("block_sparse_moe.gate", "mlp.router") for t in trainable]
    assert plan.config["moecompose"]["trainable"] == native  # the model's own names
    assert plan.totals.trainable_params == sum(t.numel for t in plan.tensors if t.trainable)


@pytest.mark.parametrize("normalize, warned", [("true", True), ("false", False)])
def test_top1_router_that_renormalises_is_warned_about(write_spec, normalize, warned) -> None:
    """Its expert always weighs 1.0: the LM loss gives such a router no gradient."""
    plan = moecompose.plan(write_spec(BTX.replace("k: 2}", f"k: 1, normalize: {normalize}}}")))
    messages = [w for w in plan.warnings if "top-1 with normalize: true" in w]
    assert bool(messages) is warned
    if warned:
        assert messages[0].startswith("layers 0-3: the ffn router") and "normalize: false" in messages[0]
