"""Evaluation of built artifacts: the loss is the mean over every predicted token (and
transformers' own for a Mixtral export), expert usage is what the routers chose (over real
tokens only, for every router kind), the hooks never outlive `evaluate`, and the plots."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file

import moecompose
from moecompose.errors import DataError
from moecompose.model import MoECausalLM
from moecompose.model.routing import Routing, TokenMixingRouter
from moecompose.training.evaluate import (
    DomainEval,
    EvalResult,
    LayerUsage,
    evaluate,
    expert_usage,
    render,
    results_json,
)
from moecompose.training.plots import plot_curves, plot_usage, read_log

VOCAB = 128  # of the `sources` checkpoints

MIXTRAL = """
moecompose: 1
sources: {{seed: {seed}, code: {code}, law: {law}}}
layers:
  - select: all
    ffn: {{experts: [seed, code, law], router: {{kind: topk, k: 2, normalize: true}}}}
output: {{format: mixtral}}
"""

# One artifact with every router kind: soft and top-k attention experts (BAM), top-k
# experts, PESC adapters, Mixture of Tokens and Nexus.
MIXED = """
moecompose: 1
sources: {{seed: {seed}, code: {code}, law: {law}}}
domains:
  code: {{embedding: ./code.safetensors}}
  law: {{embedding: ./law.safetensors}}
layers:
  - select: {{from: 0, to: 1}}
    attention: {{experts: [seed, code, law], router: {{kind: soft}}}}
    ffn: {{experts: [seed, code, law], router: {{kind: topk, k: 2}}}}
  - select: {{from: 1, to: 2}}
    attention: {{experts: [seed, code, law], share: [k, v], router: {{kind: topk, k: 1}}}}
    ffn: {{experts: {{adapters: seed, count: 4, bottleneck: 8}}, router: {{kind: topk, k: 2}}}}
  - select: {{from: 2, to: 3}}
    ffn: {{experts: {{copy: seed, count: 4}}, router: {{kind: token_mixing, group_size: 2}}}}
  - select: {{from: 3, to: 4}}
    ffn: {{shared: seed, experts: [code, law], router: {{kind: nexus}}}}
"""
MIXED_KINDS = {
    (0, "attention"): "soft", (0, "ffn"): "topk", (1, "attention"): "topk",
    (1, "ffn"): "adapters", (2, "ffn"): "token_mixing", (3, "ffn"): "nexus",
}


def build(root: Path, sources: dict[str, Path], text: str) -> Path:
    spec = root / "spec.yaml"
    spec.write_text(text.format(**{k: sources[k] for k in ("seed", "code", "law")}))
    return moecompose.build(spec, root / "out").path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    return build(tmp_path_factory.mktemp("mixtral"), sources, MIXTRAL)


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    gen = torch.Generator().manual_seed(0)
    for name in ("code", "law"):
        save_file({"v": torch.randn(1, 64, generator=gen)}, root / f"{name}.safetensors")
    return build(root, sources, MIXED)


@pytest.fixture
def mixed(mixed_path: Path) -> MoECausalLM:
    """The mixed artifact with its routers' rows scaled up: built routers are near uniform
    (rows of std 0.02), which would hide a share computed from the wrong tokens."""
    model = moecompose.load(mixed_path)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (layer.self_attn, layer.mlp):
                router = getattr(module, "router", None)
                if router is not None and hasattr(router, "weight"):
                    router.weight.mul_(100)
    return model


def blocks(rows: int, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def mean_next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Shifted cross-entropy, summed over every predicted token, over their count."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="sum")
    return ce.item() / ids[:, 1:].numel()


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- loss


def test_loss_is_the_mean_over_all_predicted_tokens_not_of_batch_means(mixtral: Path) -> None:
    model = moecompose.load(mixtral)
    data = {"code": blocks(5), "law": blocks(3, seq=7, seed=1)}
    with torch.no_grad():
        expected = {name: mean_next_token_loss(model(ids).logits, ids) for name, ids in data.items()}
    result = evaluate(model, data, batch_size=2, artifact=str(mixtral))  # batches of 2, 2, 1
    assert result.artifact == str(mixtral) and list(result.domains) == ["code", "law"]
    for name, ids in data.items():
        got = result.domains[name]
        assert got.domain == name and got.tokens == ids.shape[0] * (ids.shape[1] - 1)
        assert got.loss == pytest.approx(expected[name], abs=1e-6)
        assert got.perplexity == pytest.approx(torch.tensor(expected[name]).exp().item(), rel=1e-6)
        assert got.seconds > 0 and got.tokens_per_s > 0
    with torch.no_grad():  # the mean of the three batch means is another number
        batch_means = [mean_next_token_loss(model(b).logits, b) for b in data["code"].split(2)]
    assert abs(sum(batch_means) / 3 - expected["code"]) > 1e-4


def test_mixtral_export_loss_equals_transformers(mixtral: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(mixtral).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = blocks(6, seq=10)
    with torch.no_grad():
        expected = mean_next_token_loss(hf(ids).logits, ids)  # LM loss only: no aux terms
    ours = evaluate(moecompose.load(mixtral), {"code": ids}, batch_size=4).domains["code"]
    assert ours.loss == pytest.approx(expected, abs=1e-5)


def test_evaluate_restores_train_mode_and_rejects_empty_domains(mixtral: Path) -> None:
    model = moecompose.load(mixtral).train()
    evaluate(model, {"code": blocks(2)})
    assert model.training
    with pytest.raises(DataError, match="'law'"):
        evaluate(model, {"law": blocks(0)})
    with pytest.raises(DataError, match="'law'"):
        evaluate(model, {"law": blocks(3, seq=1)})


# --------------------------------------------------------------------------- usage


def routed_inputs(model: MoECausalLM, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """The inputs [B, S, d] of every attention and FFN module of a forward of ids."""
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for part, module in (("attention", layer.self_attn), ("ffn", layer.mlp)):
            def grab(module: Any, args: tuple[Any, ...], key: tuple[int, str] = (i, part)) -> None:
                seen[key] = args[0]
            handles.append(module.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def reference_sums(model: MoECausalLM, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Per routed layer and part, the weight per expert [E] of one batch, from calling its
    router on the layer's input: top-k index counts, soft weights, and token-mixing
    weights per token normalised over experts (groups of G rows of the batch)."""
    out = {}
    for (i, part), x in routed_inputs(model, ids).items():
        layer = model.model.layers[i]
        router = getattr(layer.self_attn if part == "attention" else layer.mlp, "router", None)
        if router is None:
            continue
        B, S, d = x.shape
        if isinstance(router, TokenMixingRouter):
            G = router.group_size
            assert B % G == 0
            groups = x.transpose(0, 1).reshape(S * B // G, G, d)  # position-major groups
            w = router(groups, torch.ones(groups.shape[:2], dtype=torch.bool))  # [M, G, E]
            out[i, part] = (w / w.sum(-1, keepdim=True)).sum((0, 1)).double()
            continue
        routing = router(x.reshape(-1, d))
        if isinstance(routing, Routing):
            E = routing.logits.shape[-1]
            out[i, part] = torch.bincount(routing.indices.flatten(), minlength=E).double()
        else:
            out[i, part] = routing.sum(0).double()
    return out


def test_usage_is_what_each_router_chose_for_every_kind(mixed: MoECausalLM) -> None:
    ids = blocks(6)
    result = evaluate(mixed, {"code": ids}, batch_size=2)  # token mixing: groups of 2 rows
    usage = result.domains["code"].usage
    assert {(u.layer, u.part): u.kind for u in usage} == MIXED_KINDS
    assert [(u.layer, u.part) for u in usage] == sorted(MIXED_KINDS, key=lambda k: (k[0], k[1] != "attention"))
    sums: dict[tuple[int, str], torch.Tensor] = {}
    for rows in ids.split(2):
        for key, value in reference_sums(mixed, rows).items():
            sums[key] = sums.get(key, 0) + value
    for u in usage:
        assert sum(u.share) == pytest.approx(1, abs=1e-9)
        expected = sums[u.layer, u.part] / sums[u.layer, u.part].sum()
        assert u.share == pytest.approx(expected.tolist(), abs=1e-6), (u.layer, u.part)
    topk = next(u for u in usage if u.kind == "topk" and u.part == "ffn")
    assert max(topk.share) - min(topk.share) > 0.05, "scaled routers choose unevenly"
    counts = sums[topk.layer, topk.part]  # token choice: assignments / (tokens * k)
    assert counts.sum().item() == ids.numel() * 2


def test_usage_leaves_padding_out(mixed: MoECausalLM) -> None:
    """A sequence padded on the right, with its attention mask, has the usage of the
    sequence alone, whatever the padding tokens (they would route elsewhere)."""
    seq = blocks(1, seq=9)
    with torch.no_grad(), expert_usage(mixed) as alone:
        mixed(seq)
    for token in (4, 127):
        ids = torch.cat([seq, torch.full((1, 5), token)], dim=1)
        mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
        with torch.no_grad(), expert_usage(mixed) as padded:
            mixed(ids, attention_mask=mask)
        for a, b in zip(alone.layers(), padded.layers(), strict=True):
            assert (a.layer, a.part, a.kind) == (b.layer, b.part, b.kind)
            assert a.share == pytest.approx(b.share, abs=1e-6), (a.layer, a.part, token)
    with torch.no_grad(), expert_usage(mixed) as unmasked:
        mixed(ids)
    assert any(a.share != pytest.approx(b.share, abs=1e-6)
               for a, b in zip(alone.layers(), unmasked.layers()))


def test_dense_layers_have_no_usage(mixtral: Path) -> None:
    torch.manual_seed(0)
    moe = {"kind": "moe", "num_experts": 4, "intermediate_size": 16,
           "router": {"kind": "topk", "k": 1, "normalize": True}}
    model = MoECausalLM.from_config({
        "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
        "layers": [{"ffn": {"kind": "dense"}}, {"ffn": moe}, {"ffn": {"kind": "dense"}}],
    })
    usage = evaluate(model, {"code": blocks(2)}).domains["code"].usage
    assert [(u.layer, u.part, u.kind, len(u.share)) for u in usage] == [(1, "ffn", "topk", 4)]
    usage = evaluate(moecompose.load(mixtral), {"code": blocks(2)}).domains["code"].usage
    assert [(u.layer, u.part, u.kind, len(u.share)) for u in usage] == [(i, "ffn", "topk", 3) for i in range(4)]


def test_hooks_are_removed_after_evaluate_and_after_an_error(mixed: MoECausalLM) -> None:
    assert no_hooks(mixed)
    with expert_usage(mixed):
        assert not no_hooks(mixed)
    evaluate(mixed, {"code": blocks(2)})
    assert no_hooks(mixed)
    bad = blocks(2)
    bad[1, 3] = 10_000  # not in the vocabulary: the embedding raises inside the forward
    mixed.train()
    with pytest.raises(IndexError):
        evaluate(mixed, {"code": blocks(2), "law": bad}, batch_size=1)
    assert no_hooks(mixed) and mixed.training
    with pytest.raises(RuntimeError, match="stop"), expert_usage(mixed):
        raise RuntimeError("stop")
    assert no_hooks(mixed)


# --------------------------------------------------------------------------- output


def small_result(artifact: str = "runs/a") -> EvalResult:
    usage = (LayerUsage(0, "attention", "soft", (0.5, 0.5)), LayerUsage(0, "ffn", "topk", (0.61, 0.12, 0.27)))
    return EvalResult(artifact, {
        "[red]code": DomainEval("[red]code", 1.25, 3.49, 110, 0.5, 240.0, usage),
        "law": DomainEval("law", float("inf"), float("inf"), 11, 0.1, 120.0, usage[1:]),
    })


def test_results_json_is_strict_json_of_every_field() -> None:
    data = json.loads(results_json([small_result(), small_result("runs/b")]))
    assert [r["artifact"] for r in data] == ["runs/a", "runs/b"]
    code = data[0]["domains"]["[red]code"]
    assert code["loss"] == 1.25 and code["perplexity"] == 3.49 and code["tokens"] == 110
    assert code["usage"][1] == {"layer": 0, "part": "ffn", "kind": "topk", "share": [0.61, 0.12, 0.27]}
    assert data[0]["domains"]["law"]["loss"] is None  # inf is not JSON


def test_render_shows_artifacts_side_by_side_and_names_verbatim() -> None:
    console = Console(record=True, width=160, markup=True)  # markup on: names must not be read as it
    render([small_result(), small_result("runs/b")], console)
    text = console.export_text()
    assert "[red]code" in text and text.count("1.2500") == 2
    assert "expert usage: a" in text and "expert usage: b" in text
    assert "[red]code 0.61" in text and "law 0.12" in text


def test_usage_heatmap_and_curves_are_pngs(mixed: MoECausalLM, tmp_path: Path) -> None:
    # matplotlib is in the test extra: a missing one fails here rather than skipping
    result = evaluate(mixed, {"code": blocks(2), "law": blocks(2, seed=1)}, artifact="mixed")
    out = plot_usage(result, tmp_path / "plots" / "usage.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs = [write_log(tmp_path / "a.jsonl"), write_log(tmp_path / "b.jsonl", offset=0.5)]
    out = plot_curves(logs, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_log(path: Path, offset: float = 0.0) -> Path:
    lines = [{"event": "start", "config": {}}]
    for step in range(1, 6):
        lines.append({"event": "train", "step": step, "loss": 3 - 0.1 * step + offset, "lr": 1e-4})
        if step % 2 == 0:
            lines.append({"event": "eval", "step": step,
                          "domains": {"code": {"loss": 3.1 - 0.1 * step}, "law": {"loss": 3.3}}})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def test_training_log_is_read_by_event(tmp_path: Path) -> None:
    log = read_log(write_log(tmp_path / "run.jsonl"))
    assert [s for s, _ in log.train] == [1, 2, 3, 4, 5]
    assert log.train[0][1] == pytest.approx(2.9)
    assert log.eval == {"code": [(2, pytest.approx(2.9)), (4, pytest.approx(2.7))], "law": [(2, 3.3), (4, 3.3)]}


@pytest.mark.parametrize(("line", "why"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"event": "train", "loss": 1.0}', "numeric 'step'"),
    ('{"event": "train", "step": 3, "loss": "high"}', "numeric 'loss'"),
    ('{"event": "eval", "step": 3, "domains": {"code": 2.0}}', "domain 'code'"),
    ('{"event": "eval", "step": 3}', "'domains'"),
])
def test_malformed_log_line_is_located(tmp_path: Path, line: str, why: str) -> None:
    path = write_log(tmp_path / "run.jsonl")
    lines = path.read_text().splitlines()
    lines.insert(3, line)
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=why) as info:
        plot_curves([path], tmp_path / "curves.png")
    assert info.value.location is not None
    assert (info.value.location.file, info.value.location.line) == (str(path), 4)
    assert f"{path}:4:" in info.value.format()


def test_plots_without_matplotlib_say_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for plot in (lambda: plot_usage(small_result(), tmp_path / "u.png"),
                 lambda: plot_curves([write_log(tmp_path / "run.jsonl")], tmp_path / "c.png")):
        with pytest.raises(DataError, match="plotting needs matplotlib") as info:
            plot()
        assert info.value.hint == "pip install 'moecompose[plot]'"
    assert not (tmp_path / "u.png").exists() and not (tmp_path / "c.png").exists()
