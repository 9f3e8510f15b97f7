"""PESC adapter experts and Mixture of Tokens, built from real checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, hf_logits, our_logits, weights

import moecompose

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("count", "k"), [(1, 1), (4, 1), (4, 2), (8, 3)])
def test_pesc_reproduces_dense_logits_at_build_time(write_spec, tmp_path, sources, count, k) -> None:
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{base: $seed}}
        layers:
          - select: all
            ffn:
              experts: {{adapters: base, count: {count}, bottleneck: 8, scale: 0.25}}
              router: {{kind: topk, k: {k}}}
        train: [router, adapters]
        """
    )
    out = moecompose.build(spec, tmp_path / "pesc").path
    assert (our_logits(out) - hf_logits(sources["seed"])).abs().max().item() <= 1e-5
    built = weights(out)
    assert not built["model.layers.0.mlp.adapters.up_proj"].any()
    assert built["model.layers.0.mlp.adapters.down_proj"].shape == (count, 8, 64)


def test_one_step_with_router_and_adapters_trainable_changes_nothing_else(write_spec, tmp_path) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {base: $seed}
        layers:
          - select: all
            ffn:
              experts: {adapters: base, count: 4, bottleneck: 8}
        train: [router, adapters]
        """
    )
    model = moecompose.load(moecompose.build(spec, tmp_path / "pesc").path)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or ".adapters." in n for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # the second step moves routers and down-projections too
        optimizer.zero_grad()
        out = model(IDS)
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), IDS[:, 1:].reshape(-1)
        ) + out.aux_loss
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the trainable tensors must move"
    assert changed <= trainable
    assert any(".adapters.up_proj" in n for n in changed)


MOT = """
moecompose: 1
sources: {base: $seed}
layers:
  - select: {from: 1, to: 4}
    ffn:
      experts: {copy: base, count: 4, drop: 0.5}
      router: {kind: token_mixing, group_size: 2, temperature: 0.7}
"""


def test_mixture_of_tokens_is_causal_across_the_batch(write_spec, tmp_path) -> None:
    model = moecompose.load(moecompose.build(write_spec(MOT), tmp_path / "mot").path)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 12), generator=gen)
    with torch.no_grad():
        base = model(ids).logits
        for t in (0, 5, 10):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(0, 128, changed[:, t + 1 :].shape, generator=gen)
            out = model(changed).logits
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"future leaked into position {t}"


def test_mixture_of_tokens_padding_never_changes_real_rows(write_spec, tmp_path) -> None:
    model = moecompose.load(moecompose.build(write_spec(MOT), tmp_path / "mot").path)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        three = model(ids).logits  # groups {0, 1} and {2, padding}
        pair = model(ids[:2]).logits
        alone = model(ids[2:]).logits  # a group of one real row and padding
    assert torch.allclose(three[:2], pair, atol=1e-6, rtol=0)
    assert torch.allclose(three[2:], alone, atol=1e-6, rtol=0)


def test_transition_gives_a_top1_artifact_that_runs_single_sequences(write_spec, tmp_path) -> None:
    import json
    import subprocess
    import sys

    built = moecompose.build(write_spec(MOT), tmp_path / "mot").path
    before = {p.name: p.read_bytes() for p in built.iterdir()}
    new = tmp_path / "sparse"
    result = subprocess.run(
        [sys.executable, "-m", "moecompose.cli", "transition", str(built), "-o", str(new)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in built.iterdir()} == before, "the source artifact changed"
    config = json.loads((new / "config.json").read_text())
    routers = [layer["ffn"].get("router") for layer in config["layers"]]
    assert routers[0] is None and all(r == {"kind": "topk", "k": 1, "normalize": True} for r in routers[1:])
    old, sparse = weights(built), weights(new)
    assert torch.allclose(sparse["model.layers.2.mlp.router.weight"],
                          old["model.layers.2.mlp.router.weight"] / 0.7)
    model = moecompose.load(new)
    with torch.no_grad():
        logits = model(IDS[:1]).logits
    assert logits.shape == (1, IDS.shape[1], 128) and torch.isfinite(logits).all()
    assert moecompose.load_spec(new / "spec.yaml").layers[0].ffn.router.kind == "topk"
    assert json.loads((new / "plan.json").read_text())["derivations"][0]["operation"] == "transition"
    again = subprocess.run(
        [sys.executable, "-m", "moecompose.cli", "transition", str(built), "-o", str(new)],
        capture_output=True, text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
