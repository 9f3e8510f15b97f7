"""Nexus end to end: domain embeddings from texts, the projected router, prompt-initialised
top-k routers and `extend`, built from real checkpoints and checked against transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_logits, our_logits, weights
from safetensors.torch import load_file, save_file

import moecompose
from moecompose import BuildError, MoeComposeError, SourceError, SpecError
from moecompose.testing import WORDS

pytestmark = pytest.mark.slow

DOMAINS = ("code", "law", "math")
TEXT_WORDS = {
    "code": ["def", "return", "import", "class", "if", "else", "while", "function", "value"],
    "law": ["law", "court", "case", "contract", "the", "of", "by", "that"],
    "math": ["math", "sum", "proof", "theorem", "equation", "number", "matrix"],
}
FFN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MOECOMPOSE_CACHE_DIR", str(folder))
    return folder


def write_texts(root: Path) -> dict[str, list[Path]]:
    """Three documents per domain, in words the tiny tokenizer knows."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in DOMAINS:
        folder = root / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        vocab = TEXT_WORDS[name]
        files = []
        for k in range(3):
            picks = torch.randint(len(vocab), (12 + 4 * k,), generator=gen).tolist()
            path = folder / f"doc{k}.txt"
            path.write_text(" ".join(vocab[p] for p in picks))
            files.append(path)
        out[name] = files
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def hf_text_embedding(path: Path, docs: list[str], max_tokens: int = 512) -> torch.Tensor:
    """Mean over documents of the mean final hidden state over each document's tokens."""
    model, tok = hf_model(path)
    means = []
    for doc in docs:
        ids = tok(doc, return_tensors="pt").input_ids[:, :max_tokens]
        means.append(model.model(ids).last_hidden_state[0].mean(0))
    return torch.stack(means).mean(0)


@torch.no_grad()
def hf_layer_inputs(path: Path, prompts: list[str]) -> torch.Tensor:
    """[layers, d]: mean over prompts of the mean hidden state entering each layer."""
    model, tok = hf_model(path)
    per_prompt = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        states = model(ids, output_hidden_states=True).hidden_states
        per_prompt.append(torch.stack([h[0].mean(0) for h in states[:-1]]))
    return torch.stack(per_prompt).mean(0)


def nexus_spec(write_spec, experts: tuple[str, ...], *, merge: str = "average",
               name: str = "spec.yaml") -> Path:
    """Seed as the shared expert of layers 1-3, ``experts`` routed, texts as domains."""
    domains = ", ".join(f"{e}: {{texts: ./data/{e}/*.txt}}" for e in experts)
    srcs = ", ".join(f"{n}: ${n}" for n in ("seed", *experts))
    return write_spec(
        f"""
        moecompose: 1
        sources: {{{srcs}}}
        merge: {merge}
        embed_with: seed
        domains: {{{domains}}}
        layers:
          - select: {{from: 1, to: 4}}
            ffn:
              shared: seed
              experts: [{", ".join(experts)}]
              router: {{kind: nexus}}
        """,
        name=name,
    )


def sha_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_nexus_build_shared_seed_routed_domains_averaged_rest(write_spec, tmp_path, sources) -> None:
    texts = write_texts(tmp_path)
    spec = nexus_spec(write_spec, DOMAINS)
    plan = moecompose.plan(spec)
    assert plan.format == "native" and "nexus" in plan.format_reason
    out = moecompose.build(plan, tmp_path / "nexus").path
    built = weights(out)
    src = {n: weights(sources[n]) for n in ("seed", *DOMAINS)}
    for i in (1, 2, 3):
        mlp = f"model.layers.{i}.mlp"
        for proj, hf in FFN.items():
            name = f"model.layers.{i}.mlp.{hf}.weight"
            assert torch.equal(built[f"{mlp}.shared_expert.{hf}.weight"], src["seed"][name])
            for j, domain in enumerate(DOMAINS):
                assert torch.equal(built[f"{mlp}.experts.{hf}"][j], src[domain][name]), proj
        w1, w2 = built[f"{mlp}.router.w1.weight"], built[f"{mlp}.router.w2.weight"]
        assert w1.shape == (128, 64) and w2.shape == (64, 64)
        # the documented initialisation: std 1/sqrt(m) and 1/d (m = d = 64 here)
        assert w1.std().item() == pytest.approx(64**-0.5, rel=0.1)
        assert w2.std().item() == pytest.approx(1 / 64, rel=0.1)
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.2.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"):
        mean = torch.stack([s[name] for s in src.values()]).mean(0)
        torch.testing.assert_close(built[name], mean, rtol=0, atol=1e-6)
    # Domain embeddings: the seed's mean-pooled final hidden states over each domain's texts.
    stored = load_file(out / "domains.safetensors")
    for j, domain in enumerate(DOMAINS):
        expected = hf_text_embedding(sources["seed"], [p.read_text() for p in texts[domain]])
        torch.testing.assert_close(stored[domain], expected, rtol=0, atol=1e-5)
        for i in (1, 2, 3):
            assert torch.equal(built[f"model.layers.{i}.mlp.router.domain_embeddings"][j], stored[domain])
    recorded = json.loads((out / "plan.json").read_text())["domains"]
    assert recorded["code"]["documents"] == [str(p.resolve()) for p in texts["code"]]
    assert recorded["code"]["embed_with"] == "seed" and len(recorded["code"]["fingerprint"]) == 64
    trainable = {t.name for t in plan.tensors if t.trainable}
    assert "model.layers.1.mlp.router.domain_embeddings" not in trainable
    assert "model.layers.1.mlp.router.w1.weight" in trainable


def test_max_docs_takes_the_first_documents_in_path_order(write_spec, tmp_path) -> None:
    texts = write_texts(tmp_path)
    spec = moecompose.load_spec(nexus_spec(write_spec, DOMAINS)).with_(
        {"domains.law.max_docs": 2, "domains.law.max_tokens": 5})
    law = moecompose.plan(spec).domains["law"]
    assert law["documents"] == [str(p.resolve()) for p in texts["law"][:2]]
    assert law["matched"] == 3 and law["max_tokens"] == 5


def test_nexus_exported_as_qwen2_moe_gives_the_native_logits_in_transformers(
    write_spec, tmp_path, sources
) -> None:
    write_texts(tmp_path)
    spec = moecompose.load_spec(nexus_spec(write_spec, DOMAINS))
    native = moecompose.build(spec, tmp_path / "native").path
    plan = moecompose.plan(spec.with_(output={"format": "qwen2_moe"}))
    assert plan.format == "qwen2_moe"
    assert any("baked into a linear gate" in w for w in plan.warnings)
    exported = moecompose.build(plan, tmp_path / "qwen").path
    torch.testing.assert_close(hf_logits(exported, "Qwen2MoeForCausalLM"), our_logits(native),
                               rtol=0, atol=1e-5)
    with pytest.raises(SpecError, match="qwen2_moe export: its nexus routers were baked"):
        moecompose.extend(exported, tmp_path / "ext", expert="more", source=sources["code"],
                          domain_texts=str(tmp_path / "data/math/*.txt"))
    assert not (tmp_path / "ext").exists()


def test_merge_can_leave_the_seed_out(write_spec, tmp_path, sources) -> None:
    write_texts(tmp_path)
    spec = nexus_spec(write_spec, DOMAINS, merge="{weights: {code: 1, law: 1, math: 1}}")
    plan = moecompose.plan(spec)
    recipe = next(t.recipe for t in plan.tensors if t.name == "model.norm.weight")
    assert recipe.op == "mean" and {r.source for r in recipe.inputs} == set(DOMAINS)


def test_router_output_matches_the_nexus_formula(write_spec, tmp_path) -> None:
    write_texts(tmp_path)
    out = moecompose.build(nexus_spec(write_spec, DOMAINS), tmp_path / "nexus").path
    model = moecompose.load(out)
    w = weights(out)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    router = model.model.layers[2].mlp.router
    weights_, indices, logits = router(x)
    dom = w["model.layers.2.mlp.router.domain_embeddings"]
    z = dom @ w["model.layers.2.mlp.router.w1.weight"].T
    e = (F.silu(z[:, :64]) * z[:, 64:]) @ w["model.layers.2.mlp.router.w2.weight"].T
    expected_logits = x @ e.T
    p = expected_logits.softmax(-1)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices[:, 0], p.argmax(-1))
    torch.testing.assert_close(weights_[:, 0], p.max(-1).values, rtol=1e-5, atol=1e-6)  # not renormalised


def test_rebuild_reuses_embeddings_until_the_texts_change(write_spec, tmp_path, monkeypatch) -> None:
    from moecompose.build import embed

    texts = write_texts(tmp_path)
    spec = nexus_spec(write_spec, DOMAINS)
    first = moecompose.build(spec, tmp_path / "a").path
    loads: list[str] = []
    original = embed.Embedder.load.__func__

    def counting(cls, name, path):
        loads.append(name)
        return original(cls, name, path)

    monkeypatch.setattr(embed.Embedder, "load", classmethod(counting))
    second = moecompose.build(spec, tmp_path / "b").path
    assert loads == [] and sha_tree(first)["model.safetensors"] == sha_tree(second)["model.safetensors"]
    texts["law"][0].write_text("court case " * 5)
    changed = moecompose.build(spec, tmp_path / "c").path
    assert loads == ["seed"]
    a, c = load_file(first / "domains.safetensors"), load_file(changed / "domains.safetensors")
    assert torch.equal(a["code"], c["code"]) and not torch.equal(a["law"], c["law"])


def test_texts_changed_between_plan_and_build_is_refused(write_spec, tmp_path) -> None:
    texts = write_texts(tmp_path)
    plan = moecompose.plan(nexus_spec(write_spec, DOMAINS))
    texts["code"][1].write_text("while while")
    with pytest.raises(BuildError, match="domain 'code': its files changed since the plan"):
        moecompose.build(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stored_embeddings_npy_and_safetensors(write_spec, tmp_path, sources) -> None:
    vec_law = torch.randn(64, generator=torch.Generator().manual_seed(1))
    vec_code = torch.randn(64, generator=torch.Generator().manual_seed(2))
    save_file({"law": vec_law[None], "other": torch.zeros(3)}, tmp_path / "law.safetensors")
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (64,), }"
    header = header + " " * (63 - (10 + len(header)) % 64) + "\n"
    (tmp_path / "code.npy").write_bytes(
        b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
        + vec_code.numpy().astype("<f4").tobytes()
    )
    spec = write_spec(
        """
        moecompose: 1
        sources: {seed: $seed, code: $code, law: $law}
        domains:
          code: {embedding: ./code.npy}
          law: {embedding: ./law.safetensors, key: law}
        layers:
          - select: all
            ffn: {shared: seed, experts: [code, law], router: {kind: nexus}}
        """
    )
    out = moecompose.build(spec, tmp_path / "out").path
    dom = weights(out)["model.layers.0.mlp.router.domain_embeddings"]
    assert torch.equal(dom[0], vec_code) and torch.equal(dom[1], vec_law)


def test_prompt_initialised_rows_equal_transformers_hidden_states(write_spec, tmp_path, sources) -> None:
    prompts = {"code": ["def value return", "import class"], "law": ["the court case", "contract law"],
               "math": ["proof of the theorem"]}
    negative = ["the of and"]
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{seed: $seed, code: $code, law: $law, math: $math}}
        layers:
          - select: all
            ffn:
              experts: [code, law, math]
              router:
                kind: topk
                k: 1
                init:
                  prompts: {json.dumps(prompts)}
                  negative: {{law: {json.dumps(negative)}}}
                  source: code
        """
    )
    result = moecompose.build(spec, tmp_path / "out")
    assert result.warnings == ()
    built = weights(result.path)
    states = {e: hf_layer_inputs(sources["code"], p) for e, p in prompts.items()}
    states["law"] = states["law"] - hf_layer_inputs(sources["code"], negative)
    router = [k for k in built if k.endswith("0.block_sparse_moe.gate.weight")]
    assert router, "a top-k model is exported as Mixtral"
    for i in range(4):
        rows = built[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        expected = torch.stack([F.normalize(states[e][i], dim=0) for e in prompts])
        torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)


def test_nearly_parallel_prompt_rows_are_a_build_warning(write_spec, tmp_path) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {code: $code, law: $law}
        layers:
          - select: all
            ffn:
              experts: [code, law]
              router: {kind: topk, k: 1, init: {prompts: {code: [the court], law: [the court case]}}}
        """
    )
    result = moecompose.build(spec, tmp_path / "out")
    assert len(result.warnings) == 1
    assert "experts 'code' and 'law' are nearly parallel" in result.warnings[0]


# ------------------------------------------------------------------------------ extend


def test_extend_equals_building_with_the_expert(write_spec, tmp_path, sources) -> None:
    write_texts(tmp_path)
    two = moecompose.build(nexus_spec(write_spec, ("code", "law"), name="two.yaml"), tmp_path / "two").path
    three = moecompose.build(nexus_spec(write_spec, DOMAINS, name="three.yaml"), tmp_path / "three").path
    before = sha_tree(two)
    result = moecompose.extend(two, tmp_path / "ext", expert="math", source=sources["math"],
                               domain_texts=str(tmp_path / "data" / "math" / "*.txt"))
    assert sha_tree(two) == before  # the original is only read
    ext, ref = weights(result.path), weights(three)
    assert ext.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ext[name], ref[name], rtol=0, atol=1e-6, msg=name)
    spec = moecompose.load_spec(result.path / "spec.yaml")
    assert spec.sources["math"] == str(sources["math"])
    assert spec.layers[0].ffn.experts == ["code", "law", "math"]
    assert spec.domains["math"].texts.endswith("data/math/*.txt")
    assert spec.merge == "average"
    plan = json.loads((result.path / "plan.json").read_text())
    assert plan["derivations"][-1]["operation"] == "extend"
    assert plan["derivations"][-1]["lambda"] == pytest.approx(1 / 4)
    assert "math" in load_file(result.path / "domains.safetensors")
    model = moecompose.load(result.path)
    assert model.config.layers[1].ffn.num_experts == 3


def test_extend_carries_trained_router_weights_over(write_spec, tmp_path, sources) -> None:
    write_texts(tmp_path)
    two = moecompose.build(nexus_spec(write_spec, ("code", "law")), tmp_path / "two").path
    trained = load_file(two / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    for name in list(trained):
        if ".router.w" in name or ".experts." in name:
            trained[name] = trained[name] + 0.1 * torch.randn(trained[name].shape, generator=gen)
    save_file(trained, two / "model.safetensors", metadata={"format": "pt"})
    for name in ("code", "law"):  # the artifact keeps its domain vectors: texts not needed
        for doc in (tmp_path / "data" / name).iterdir():
            doc.unlink()
    ext = weights(moecompose.extend(two, tmp_path / "ext", expert="math", source=sources["math"],
                                    domain_texts=str(tmp_path / "data/math/*.txt"), lam=0.5).path)
    for name, value in trained.items():
        if ".router.w" in name:
            assert torch.equal(ext[name], value), name
        if ".experts." in name:
            assert torch.equal(ext[name][:2], value), name
    norm = "model.norm.weight"
    math = weights(sources["math"])[norm]
    torch.testing.assert_close(ext[norm], 0.5 * trained[norm] + 0.5 * math, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row_from", ["prompts", "documents"])
def test_extend_a_topk_router_with_a_new_row(write_spec, tmp_path, sources, row_from) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {seed: $seed, code: $code, law: $law}
        layers:
          - select: all
            ffn: {experts: [seed, code, law], router: {kind: topk, k: 2}}
        """
    )
    base = moecompose.build(spec, tmp_path / "btx").path
    prompts = ["proof of the theorem", "sum of the matrix"]
    if row_from == "prompts":
        given = {"prompts": prompts}
    else:
        for k, prompt in enumerate(prompts):
            (tmp_path / f"m{k}.txt").write_text(prompt)
        given = {"domain_texts": str(tmp_path / "m*.txt")}
    ext = moecompose.extend(base, tmp_path / "ext", expert="math", source=sources["math"],
                            **given).path
    old, new = weights(base), weights(ext)
    states = hf_layer_inputs(sources["seed"], prompts)
    for i in range(4):
        name = f"model.layers.{i}.block_sparse_moe.gate.weight"
        assert torch.equal(new[name][:3], old[name])
        scale = old[name].norm(dim=-1).mean()
        torch.testing.assert_close(new[name][3], F.normalize(states[i], dim=0) * scale,
                                   rtol=0, atol=1e-6)
        assert torch.equal(new[f"model.layers.{i}.block_sparse_moe.experts.3.w1.weight"],
                           weights(sources["math"])[f"model.layers.{i}.mlp.gate_proj.weight"])
    cfg = json.loads((ext / "config.json").read_text())
    assert cfg["num_local_experts"] == 4


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("domains", "layer", "message", "where"),
    [
        ("{seed: {texts: ./data/code/*.txt}, code: {texts: ./data/code/*.txt}}",
         "{shared: seed, experts: [code], router: {kind: nexus}}",
         "domain 'seed' is not a routed expert of any nexus layer", (4, 11)),
        ("{code: {texts: ./data/code/*.txt}}",
         "{shared: seed, experts: [code, law], router: {kind: nexus}}",
         "the nexus router needs a domain for every routed expert; 'law' has none", (8, 59)),
        ("{code: {texts: ./nothing/*.txt}, law: {texts: ./data/law/*.txt}}",
         "{shared: seed, experts: [code, law], router: {kind: nexus}}",
         "domain 'code': texts './nothing/*.txt' match no file", (4, 25)),
        ("{code: {texts: ./data/code/*.txt}, law: {texts: ./empty/*.txt}}",
         "{shared: seed, experts: [code, law], router: {kind: nexus}}",
         "domain 'law': document", (4, 58)),
        ("{code: {texts: ./data/code/*.txt}, law: {embedding: ./narrow.safetensors}}",
         "{shared: seed, experts: [code, law], router: {kind: nexus}}",
         "domain 'law': the embedding has width 32, expected 64", (4, 62)),
    ],
)
def test_bad_domains_are_located_errors_and_nothing_is_written(
    write_spec, tmp_path, domains, layer, message, where
) -> None:
    write_texts(tmp_path)
    save_file({"v": torch.ones(32)}, tmp_path / "narrow.safetensors")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{seed: $seed, code: $code, law: $law}}
        embed_with: seed
        domains: {domains}
        layers:
          - select: all
            ffn:
              {layer}
        """
    )
    with pytest.raises(MoeComposeError) as info:
        moecompose.build(spec, tmp_path / "out")
    assert message in info.value.message
    assert (info.value.location.line, info.value.location.column) == where
    assert not (tmp_path / "out").exists()


def test_extend_refuses_a_source_of_another_architecture(write_spec, tmp_path, sources) -> None:
    write_texts(tmp_path)
    two = moecompose.build(nexus_spec(write_spec, ("code", "law")), tmp_path / "two").path
    with pytest.raises(SourceError, match="'wide' differ in hidden_size: 64 vs 96"):
        moecompose.extend(two, tmp_path / "ext", expert="wide", source=sources["wide"],
                          domain_texts=str(tmp_path / "data/math/*.txt"))
    assert not (tmp_path / "ext").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, SpecError, "the nexus router needs the new expert's domain"),
        ({"domain_texts": "nowhere/*.txt"}, SpecError, "texts"),
        ({"domain_texts": "data/math/*.txt", "expert": "code"}, SpecError,
         "already has a source named 'code'"),
        ({"domain_texts": "data/math/*.txt", "lam": 1.5}, BuildError, "outside [0, 1]"),
    ],
)
def test_extend_bad_arguments(write_spec, tmp_path, sources, monkeypatch, kwargs, error, message) -> None:
    write_texts(tmp_path)
    two = moecompose.build(nexus_spec(write_spec, ("code", "law")), tmp_path / "two").path
    monkeypatch.chdir(tmp_path)
    args = {"expert": "math", "source": sources["math"], **kwargs}
    with pytest.raises(error) as info:
        moecompose.extend(two, tmp_path / "ext", **args)
    assert message in info.value.message
    assert not (tmp_path / "ext").exists()


def test_words_used_by_the_texts_are_in_the_tokenizer() -> None:
    assert {w for words in TEXT_WORDS.values() for w in words} <= set(WORDS)


def test_extend_on_the_command_line(write_spec, tmp_path, sources) -> None:
    from click.testing import CliRunner

    from moecompose.cli import main

    write_texts(tmp_path)
    two = moecompose.build(nexus_spec(write_spec, ("code", "law")), tmp_path / "two").path
    runner = CliRunner()
    args = ["extend", str(two), "--expert", f"math={sources['math']}",
            "--domain-texts", str(tmp_path / "data/math/*.txt"), "-o", str(tmp_path / "ext")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"extended {two} by 'math'" in result.output
    card = (tmp_path / "ext" / "README.md").read_text()
    assert "## Extension" in card and "lambda = 0.25" in card
    again = runner.invoke(main, args)  # the output exists now
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(main, ["extend", str(two), "--expert", "math", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "expected NAME=PATH" in bad.output
    assert not (tmp_path / "x").exists()
