"""Source families beyond Llama/Mistral/Qwen2: Qwen3 (per-head q/k norms, explicit
head_dim) and its MoE export, OLMo 2, Phi-3, Gemma 2 and Gemma 3, each checked against
transformers' own classes."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompose
from moecompose.errors import SourceError, SpecError
from moecompose.sources.checkpoint import open_checkpoint
from moecompose.testing import make_dense

HEAD_DIM = 32  # 4 heads x 32 = 128 != hidden 64: the explicit head_dim path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen3")
    return {
        "seed": make_dense(root / "seed", family="qwen3", seed=0, head_dim=HEAD_DIM),
        "code": make_dense(root / "code", family="qwen3", seed=1, base_seed=0, head_dim=HEAD_DIM),
        "law": make_dense(root / "law", family="qwen3", seed=2, base_seed=0, head_dim=HEAD_DIM),
        "llama": make_dense(root / "llama", seed=3),
    }


def spec(tmp_path: Path, body: str, sources: dict[str, Path]) -> Path:
    path = tmp_path / "spec.yaml"
    head = "moecompose: 1\nsources: {" + ", ".join(f"{k}: {v}" for k, v in sources.items()) + "}\n"
    path.write_text(head + textwrap.dedent(body))
    return path


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ids, mask = ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        a = ours(ids, attention_mask=mask).logits[mask.bool()]
        b = theirs(ids, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qwen3_dense_forward_equals_transformers(qwen3: dict[str, Path], tmp_path: Path) -> None:
    path = moecompose.build(spec(tmp_path, "layers: []\n", {"seed": qwen3["seed"]}),
                            tmp_path / "dense").path
    assert json.loads((path / "config.json").read_text())["qk_norm"] == "head"
    assert_same_logits(moecompose.load(path), AutoModelForCausalLM.from_pretrained(qwen3["seed"]))


def test_qwen3_identical_copies_equal_the_dense_model(qwen3: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        layers:
        - select: all
          ffn: {experts: {copy: seed, count: 4}, router: {kind: topk, k: 2}}
        output: {format: native}
        """
    path = moecompose.build(spec(tmp_path, body, {"seed": qwen3["seed"]}), tmp_path / "moe").path
    assert_same_logits(moecompose.load(path), AutoModelForCausalLM.from_pretrained(qwen3["seed"]))


def test_qwen3_btx_exports_as_qwen3_moe_and_loads_in_transformers(
        qwen3: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        layers:
        - select: {from: 1}
          ffn: {experts: [seed, code, law]}
        """
    sources = {k: qwen3[k] for k in ("seed", "code", "law")}
    plan = moecompose.plan(spec(tmp_path, body, sources))
    assert plan.format == "qwen3_moe"
    assert "mixtral" in plan.format_reason and "q/k norms" in plan.format_reason
    path = moecompose.build(plan, tmp_path / "btx").path
    theirs = AutoModelForCausalLM.from_pretrained(path)
    assert type(theirs).__name__ == "Qwen3MoeForCausalLM"
    assert theirs.config.mlp_only_layers == [0]
    assert_same_logits(moecompose.load(path), theirs)


def test_qwen3_moe_refuses_what_it_cannot_express(qwen3: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        layers:
        - select: all
          ffn: {experts: [code, law], shared: seed}
        output: {format: qwen3_moe}
        """
    sources = {k: qwen3[k] for k in ("seed", "code", "law")}
    with pytest.raises(SpecError, match="a shared expert"):
        moecompose.plan(spec(tmp_path, body, sources))
    llama = """\
        layers:
        - select: all
          ffn: {experts: {copy: seed, count: 2}}
        output: {format: qwen3_moe}
        """
    with pytest.raises(SpecError, match="without q/k norms"):
        moecompose.plan(spec(tmp_path, llama, {"seed": qwen3["llama"]}))


def test_attention_experts_over_qwen3_are_a_located_refusal(qwen3: dict[str, Path],
                                                           tmp_path: Path) -> None:
    body = """\
        layers:
        - select: all
          ffn: {experts: [code, law]}
          attention: {experts: [code, law]}
        """
    path = spec(tmp_path, body, {k: qwen3[k] for k in ("code", "law")})
    with pytest.raises(SourceError, match=r"spec\.yaml:6:\d+: attention experts over qwen3"):
        moecompose.validate(moecompose.load_spec(path))


def test_mixing_qwen3_and_llama_is_a_located_error(qwen3: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        layers:
        - select: all
          ffn: {experts: [a, b]}
        """
    path = spec(tmp_path, body, {"a": qwen3["seed"], "b": qwen3["llama"]})
    with pytest.raises(SourceError) as info:
        moecompose.validate(moecompose.load_spec(path))
    assert "spec.yaml" in str(info.value) and "qwen3" in str(info.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("use_sliding_window", True, "use_sliding_window: true"),
    ("layer_types", ["full_attention", "sliding_attention", "full_attention", "full_attention"],
     "layer_types holds 'sliding_attention'"),
])
def test_unsupported_qwen3_variants_name_the_field(key: str, value: object, message: str,
                                                   qwen3: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "variant"
    shutil.copytree(qwen3["seed"], source)
    config = json.loads((source / "config.json").read_text())
    config[key] = value
    config["sliding_window"] = 4
    (source / "config.json").write_text(json.dumps(config))
    body = "layers:\n- select: all\n  ffn: {experts: {copy: seed, count: 2}}\n"
    with pytest.raises(SourceError, match=message):
        moecompose.validate(moecompose.load_spec(spec(tmp_path, body, {"seed": source})))


def test_the_support_table_in_the_docs_is_current() -> None:
    from moecompose.support import support_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "families.md").read_text()
    block = doc.split("<!-- support table: generated -->\n")[1].split("<!-- end of support table -->")[0]
    assert block == support_table()


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("olmo2")
    return {
        "seed": make_dense(root / "seed", family="olmo2", seed=0),
        "code": make_dense(root / "code", family="olmo2", seed=1, base_seed=0),
        "law": make_dense(root / "law", family="olmo2", seed=2, base_seed=0),
    }


def test_olmo2_dense_and_identical_copies_equal_transformers(olmo2: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """OLMo 2: norms after each branch, q/k norms over all heads."""
    theirs = AutoModelForCausalLM.from_pretrained(olmo2["seed"])
    dense = moecompose.build(spec(tmp_path, "layers: []\n", {"seed": olmo2["seed"]}),
                             tmp_path / "dense").path
    config = json.loads((dense / "config.json").read_text())
    assert (config["qk_norm"], config["norm_placement"]) == ("full", "post")
    assert_same_logits(moecompose.load(dense), theirs)
    body = """\
        layers:
        - select: all
          ffn: {experts: {copy: seed, count: 4}, router: {kind: topk, k: 2}}
        """
    path = moecompose.build(spec(tmp_path, body, {"seed": olmo2["seed"]}), tmp_path / "moe").path
    assert_same_logits(moecompose.load(path), theirs)


def test_olmo2_btx_builds_natively_and_says_why(olmo2: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        layers:
        - select: all
          ffn: {experts: [seed, code, law]}
        """
    plan = moecompose.plan(spec(tmp_path, body, olmo2))
    assert plan.format == "native"
    assert "q/k norms over all heads (OLMo 2 attention)" in plan.format_reason
    model = moecompose.load(moecompose.build(plan, tmp_path / "btx").path)
    ids, _ = ids_and_mask()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_olmo2_parallel_block_is_a_located_refusal(olmo2: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        block: parallel
        layers:
        - select: all
          ffn: {experts: [code, law]}
        """
    path = spec(tmp_path, body, {k: olmo2[k] for k in ("code", "law")})
    with pytest.raises(SourceError, match=r"spec\.yaml:3:\d+: block: parallel over olmo2"):
        moecompose.validate(moecompose.load_spec(path))


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Phi-3: q, k and v fused in one qkv_proj, gate and up in one gate_up_proj."""
    root = tmp_path_factory.mktemp("phi3")
    return {
        "seed": make_dense(root / "seed", family="phi3", seed=0),
        "code": make_dense(root / "code", family="phi3", seed=1, base_seed=0),
        "law": make_dense(root / "law", family="phi3", seed=2, base_seed=0),
    }


def test_phi3_fused_tensors_are_read_as_roles(phi3: dict[str, Path], tmp_path: Path) -> None:
    theirs = AutoModelForCausalLM.from_pretrained(phi3["seed"])
    body = """\
        layers:
        - select: all
          ffn: {experts: {copy: seed, count: 4}}
        output: {format: native}
        """
    path = moecompose.build(spec(tmp_path, body, {"seed": phi3["seed"]}), tmp_path / "moe").path
    assert_same_logits(moecompose.load(path), theirs)
    fused = theirs.model.layers[1].self_attn.qkv_proj.weight
    q = moecompose.load(path).model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, fused[: q.shape[0]])


def test_phi3_btx_with_drop_upcycling_exports_as_mixtral(phi3: dict[str, Path], tmp_path: Path) -> None:
    body = """\
        layers:
        - select: all
          ffn: {experts: [seed, code, law]}
        """
    path = moecompose.build(spec(tmp_path, body, phi3), tmp_path / "btx").path
    theirs = AutoModelForCausalLM.from_pretrained(path)
    assert type(theirs).__name__ == "MixtralForCausalLM"
    assert_same_logits(moecompose.load(path), theirs)
    drop = """\
        layers:
        - select: all
          ffn: {experts: {copy: seed, count: 2, drop: 0.5}}
        """
    model = moecompose.load(moecompose.build(spec(tmp_path, drop, {"seed": phi3["seed"]}),
                                             tmp_path / "drop").path)
    ids, _ = ids_and_mask()
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(("change", "message"), [
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75 is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                          "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "rope type 'longrope' is not supported"),
    ({"intermediate_size": 64}, "gate_up_proj.weight' has shape"),
])
def test_unsupported_phi3_variants_are_located(change: dict, message: str, phi3: dict[str, Path],
                                               tmp_path: Path) -> None:
    source = tmp_path / "variant"
    shutil.copytree(phi3["seed"], source)
    config = json.loads((source / "config.json").read_text())
    config.update(change)
    (source / "config.json").write_text(json.dumps(config))
    body = "layers:\n- select: all\n  ffn: {experts: {copy: seed, count: 2}}\n"
    with pytest.raises(SourceError, match=message):
        moecompose.validate(moecompose.load_spec(spec(tmp_path, body, {"seed": source})))


# Gemma 3 (text) and Gemma 2: (1+w) RMSNorms before and after each branch, embeddings
# scaled by sqrt(d), GeGLU FFNs, scores scaled by query_pre_attn_scalar, sliding-window and
# global layers; Gemma 3 adds per-head q/k norms and a local rope base, Gemma 2 soft-caps.
GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
GEMMA = {
    "gemma3": dict(
        head_dim=HEAD_DIM, sliding_window=4, tie_word_embeddings=True, layer_types=GEMMA_LAYERS,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "gemma2": dict(
        head_dim=HEAD_DIM, sliding_window=4, tie_word_embeddings=True, layer_types=GEMMA_LAYERS,
        query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
}
COPIES = """\
    layers:
    - select: all
      ffn: {experts: {copy: seed, count: 4}, router: {kind: topk, k: 2}}
    output: {format: native}
    """


def make_gemma(path: Path, family: str, seed: int, base_seed: int | None = None) -> Path:
    """A tiny Gemma checkpoint whose norm weights are far from their zero init (which
    would hide a missing 1 + w)."""
    return make_dense(path, family=family, seed=seed, base_seed=base_seed, **GEMMA[family])


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma")
    return {family: make_gemma(root / family, family, seed=0) for family in GEMMA}


def gemma_reference(path: Path) -> torch.nn.Module:
    """transformers' model, eager: its SDPA path cannot soft-cap."""
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


@pytest.mark.parametrize("family", list(GEMMA))
def test_gemma_dense_and_identical_copies_equal_transformers(family: str, gemma: dict[str, Path],
                                                             tmp_path: Path) -> None:
    theirs = gemma_reference(gemma[family])
    dense = moecompose.build(spec(tmp_path, "layers: []\n", {"seed": gemma[family]}),
                             tmp_path / "dense").path
    config = json.loads((dense / "config.json").read_text())
    assert (config["hidden_act"], config["norm_placement"], config["norm_unit_offset"],
            config["layer_types"]) == ("gelu_tanh", "sandwich", True, GEMMA_LAYERS)
    assert_same_logits(moecompose.load(dense), theirs)
    path = moecompose.build(spec(tmp_path, COPIES, {"seed": gemma[family]}), tmp_path / "moe").path
    assert_same_logits(moecompose.load(path), theirs)


def test_gemma_sources_refuse_hugging_face_formats_saying_why(gemma: dict[str, Path],
                                                              tmp_path: Path) -> None:
    auto = COPIES.replace("format: native", "format: auto")
    plan = moecompose.plan(spec(tmp_path, auto, {"seed": gemma["gemma3"]}))
    assert plan.format == "native" and "not mixtral: per-head q/k norms" in plan.format_reason
    mixtral = COPIES.replace("format: native", "format: mixtral")
    with pytest.raises(SpecError) as info:
        moecompose.plan(spec(tmp_path, mixtral, {"seed": gemma["gemma2"]}))
    message = str(info.value)
    assert re.search(r"spec\.yaml:\d+:\d+: format 'mixtral' cannot express this model", message)
    for reason in ("gelu_tanh experts", "(1+w) norms", "scaled embeddings",
                   "attention logit soft-capping", "final logit soft-capping",
                   "a sliding window on some layers only"):
        assert reason in message


def test_mixing_gemma_families_is_a_located_error(gemma: dict[str, Path], tmp_path: Path) -> None:
    body = "layers:\n- select: all\n  ffn: {experts: [a, b]}\n"
    path = spec(tmp_path, body, {"a": gemma["gemma3"], "b": gemma["gemma2"]})
    with pytest.raises(SourceError, match=r"spec\.yaml:2:\d+: sources 'a' and 'b' differ in "
                                          r"model_type: 'gemma3_text' vs 'gemma2'"):
        moecompose.validate(moecompose.load_spec(path))


def test_gemma3_older_config_layout_reads_as_the_newer(gemma: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """Before transformers 5: rope_theta, rope_scaling (global layers), rope_local_base_freq
    and sliding_window_pattern instead of rope_parameters per layer type and layer_types."""
    source = tmp_path / "older"
    shutil.copytree(gemma["gemma3"], source)
    config = json.loads((source / "config.json").read_text())
    del config["rope_parameters"], config["layer_types"]
    config.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0},
                  rope_local_base_freq=100.0, sliding_window_pattern=2)
    (source / "config.json").write_text(json.dumps(config))
    older, newer = open_checkpoint("a", source).arch, open_checkpoint("a", gemma["gemma3"]).arch
    assert older.layer_types == ("sliding_attention", "full_attention") * 2
    assert dataclasses.replace(older, layer_types=newer.layer_types) == newer


@pytest.mark.parametrize(("rope", "message"), [
    ({"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     r"rope type 'yarn' is not supported \(config.json field 'rope_parameters.full_attention'\)"),
    ({"full_attention": {"rope_type": "default", "rope_theta": 1e4},
      "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     r"rope type 'linear' is not supported on sliding-window layers \(config.json field "
     r"'rope_parameters.sliding_attention'\)"),
])
def test_unsupported_gemma3_rope_is_a_located_refusal(rope: dict, message: str,
                                                      gemma: dict[str, Path], tmp_path: Path) -> None:
    source = tmp_path / "variant"
    shutil.copytree(gemma["gemma3"], source)
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"] = rope
    (source / "config.json").write_text(json.dumps(config))
    body = "layers:\n- select: all\n  ffn: {experts: {copy: seed, count: 2}}\n"
    with pytest.raises(SourceError, match=r"spec\.yaml:2:\d+: source 'seed' .*" + message):
        moecompose.validate(moecompose.load_spec(spec(tmp_path, body, {"seed": source})))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(GEMMA))
def test_gemma_btx_of_three_sources_builds_natively(family: str, gemma: dict[str, Path],
                                                   tmp_path: Path) -> None:
    sources = {"seed": gemma[family],
               "code": make_gemma(tmp_path / "code", family, seed=1, base_seed=0),
               "law": make_gemma(tmp_path / "law", family, seed=2, base_seed=0)}
    body = """\
        layers:
        - select: all
          ffn: {experts: [seed, code, law]}
        """
    plan = moecompose.plan(spec(tmp_path, body, sources))
    assert plan.format == "native"
    model = moecompose.load(moecompose.build(plan, tmp_path / "btx").path)
    ids, mask = ids_and_mask()
    out = model(ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # GeGLU experts train through the grouped op's backward
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_gemma2_methods_keep_the_dense_function(gemma: dict[str, Path], tmp_path: Path) -> None:
    """Attention experts (soft-capped, scaled as the source's), fine-grained copies with a
    shared expert, and adapters: each starts as the dense model (a shared expert beside
    copies adds the FFN once more, so its layer is checked against twice the FFN)."""
    body = """\
        layers:
        - select: [0, 1]
          ffn: {experts: {copy: seed, count: 2}, granularity: 2, router: {kind: topk, k: 1}}
          attention: {experts: [seed, seed]}
        - select: [2]
          ffn: {experts: {adapters: seed, count: 2}}
        - select: [3]
          ffn: {experts: {copy: seed, count: 2}, shared: seed}
        """
    source = gemma["gemma2"]
    model = moecompose.load(moecompose.build(spec(tmp_path, body, {"seed": source}),
                                             tmp_path / "mix").path)
    theirs = gemma_reference(source)
    mlp = theirs.model.layers[3].mlp
    mlp.down_proj.weight.data *= 2  # routed copies + shared expert = 2 x the dense FFN
    assert_same_logits(model, theirs)
