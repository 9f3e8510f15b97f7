"""The model side of training: `labels` give a loss that padding does not change, artifacts
load straight into their tensors (no random initialisation), train mode reaches the Nexus
projection, and exported artifacts keep their trainable sets."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import IDS, weights
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

import moecompose
from moecompose import formats
from moecompose.loader import weight_files
from moecompose.model import ModelConfig, MoECausalLM, NexusRouter
from moecompose.model.adapters import GroupedAdapters
from moecompose.model.compile import compile_model, supports_shapes_spec
from moecompose.model.parts import RotaryEmbedding

TOKENS = IDS % 64  # [2, 9], in the vocabulary of the models below
AUX = {"load_balance": 0.05, "z_loss": 0.01}  # large, so that a wrong aux loss shows
FFNS: dict[str, dict[str, Any]] = {
    "topk": {"kind": "moe", "num_experts": 4, "intermediate_size": 32,
             "router": {"kind": "topk", "k": 2, "normalize": True},
             "shared_expert": {"intermediate_size": 16, "gate": True}, "aux_loss": AUX},
    "nexus": {"kind": "moe", "num_experts": 3, "intermediate_size": 32,
              "router": {"kind": "nexus", "k": 1, "normalize": False, "domain_dim": 8},
              "shared_expert": {"intermediate_size": 16, "gate": False}, "aux_loss": AUX},
    "adapters": {"kind": "adapters", "num_experts": 4, "intermediate_size": 48, "bottleneck": 8,
                 "router": {"kind": "topk", "k": 2, "normalize": True}, "aux_loss": AUX},
    "token_mixing": {"kind": "moe", "num_experts": 4, "intermediate_size": 32,
                     "router": {"kind": "token_mixing", "group_size": 2}},
}


def config(ffn: str = "topk", **overrides: Any) -> dict[str, Any]:
    return {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "layers": [{"ffn": {"kind": "dense"}}, {"ffn": copy.deepcopy(FFNS[ffn])}],
        **overrides,
    }


def model_of(ffn: str = "topk", **overrides: Any) -> MoECausalLM:
    torch.manual_seed(0)
    model = MoECausalLM.from_config(config(ffn, **overrides))
    with torch.no_grad():  # domain embeddings are zero until built; give routers a choice
        for module in model.modules():
            if isinstance(module, NexusRouter):
                module.domain_embeddings.normal_()
            if isinstance(module, GroupedAdapters):
                module.up_proj.normal_(std=0.1)  # adapters that add something
    return model


# --------------------------------------------------------------------------- loss


def test_loss_is_shifted_cross_entropy_plus_aux_loss() -> None:
    model = model_of()
    labels = TOKENS.clone()
    labels[0, 3] = labels[1, 7] = -100
    out = model(TOKENS, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, expected + out.aux_loss, rtol=0, atol=1e-6)
    assert model(TOKENS).loss is None


def test_output_keeps_its_fields_and_order() -> None:
    out = model_of()(TOKENS)
    logits, aux, cache = out[:3]
    assert logits is out.logits and aux is out.aux_loss and cache is None and out.loss is None


def pad(ids: torch.Tensor, before: int, after: int, token: int) -> tuple[torch.Tensor, ...]:
    """ids [S] -> ([1, before + S + after] ids, mask, position ids), padded with `token`."""
    S = ids.shape[0]
    row = torch.cat([torch.full((before,), token), ids, torch.full((after,), token)])
    mask = torch.cat([torch.zeros(before), torch.ones(S), torch.zeros(after)]).long()
    positions = (mask.cumsum(0) - 1).clamp(min=0)
    return row[None], mask[None], positions[None]


@pytest.mark.parametrize("ffn", ["topk", "nexus", "adapters"])
def test_padding_changes_neither_the_lm_loss_nor_the_aux_loss(ffn: str) -> None:
    """A batch of one sequence padded on the right and the same one padded on the left
    has the loss (LM and aux) of that sequence alone, whatever the padding tokens are."""
    model = model_of(ffn).eval()
    seq = TOKENS[0]
    alone = model(seq[None], labels=seq[None])
    for token in (0, 63):
        right, left = pad(seq, 0, 4, token), pad(seq, 3, 1, token)
        ids, mask, positions = (torch.cat(pair) for pair in zip(right, left, strict=True))
        labels = ids.masked_fill(mask == 0, token)  # padding labelled as a token: masked anyway
        out = model(ids, attention_mask=mask, position_ids=positions, labels=labels)
        torch.testing.assert_close(out.aux_loss, alone.aux_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.loss, alone.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logits[0, :9], alone.logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.logits[1, 3:12], alone.logits[0], rtol=0, atol=1e-5)


def test_aux_loss_counts_only_real_tokens() -> None:
    """The masked aux loss is the aux loss of the real tokens' router logits; the padding's
    routing, were it counted, would change it."""
    model = model_of().eval()
    ids, mask, _ = pad(TOKENS[0], 0, 5, 0)
    unmasked = model(ids).aux_loss
    masked = model(ids, attention_mask=mask).aux_loss
    assert not torch.allclose(masked, unmasked)
    torch.testing.assert_close(masked, model(TOKENS[:1]).aux_loss, rtol=1e-5, atol=1e-7)


def test_token_mixing_padding_does_not_change_real_rows() -> None:
    """Mixture of Tokens mixes the rows of a batch: padded tokens get weight 0 in their
    group, so what they hold changes neither the real tokens' logits nor the loss."""
    model = model_of("token_mixing").eval()
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    outs = []
    for token in (0, 63):
        ids = TOKENS.masked_fill(mask == 0, token)
        outs.append(model(ids, attention_mask=mask, labels=ids))
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=0, atol=1e-6)
    real = mask.bool()
    torch.testing.assert_close(outs[0].logits[real], outs[1].logits[real], rtol=0, atol=1e-5)
    alone = model(TOKENS[:1]).logits  # a position with one real row mixes it with nothing
    torch.testing.assert_close(outs[0].logits[0, 6:], alone[0, 6:], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not supports_shapes_spec(), reason="needs torch.compile(shapes_spec=)")
@pytest.mark.parametrize("ffn", ["topk", "token_mixing"])
def test_compiled_loss_with_padding_matches_eager_without_recompiling(ffn: str) -> None:
    """Labels and a padding mask (which reaches the aux loss and the token mixing) compile
    into one graph for every batch size and length, with eager's gradients."""
    torch._dynamo.reset()
    counters.clear()
    model = model_of(ffn)
    compiled = compile_model(model)
    for batch, seq in [(2, 7), (1, 1), (3, 20)]:
        ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        mask[0, seq // 2 + 1:] = 0
        grads = []
        for run in (compiled, model):
            model.zero_grad()
            out = run(ids, attention_mask=mask, labels=ids)
            out.loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert counters["stats"]["unique_graphs"] == 1, f"recompiled at {batch}x{seq}"
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- loading


def save_native(model: MoECausalLM, path: Path) -> Path:
    """Write `model` as a native artifact (its config and one safetensors file)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(state, path / "model.safetensors")
    return path


def old_way(path: Path, dtype: str | None = None) -> MoECausalLM:
    """How artifacts loaded before: a randomly initialised model, then the tensors (read
    with safetensors and renamed by the format) copied in."""
    data = json.loads((path / "config.json").read_text())
    fmt = formats.by_model_type(data["model_type"])
    native = ModelConfig.from_dict({**fmt.read_config(data), **({"dtype": dtype} if dtype else {})})
    model = MoECausalLM.from_config(native)
    tensors = {}
    for file in weight_files(path):
        tensors.update(load_file(file))
    model.load_weights(fmt.read_tensors(native, tensors))
    return model.eval()


@pytest.mark.parametrize("ffn", ["topk", "nexus", "adapters", "token_mixing"])
def test_load_assigns_the_files_tensors_without_random_initialisation(ffn: str, tmp_path: Path) -> None:
    path = save_native(model_of(ffn, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                       tmp_path / "m")
    rng = torch.random.get_rng_state()
    model = moecompose.load(path)
    assert torch.equal(torch.random.get_rng_state(), rng), "something drew random numbers"
    reference = old_way(path)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    fresh = RotaryEmbedding(8, 10000.0, model.config.rope_scaling).inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh)
    for module in model.modules():
        assert not module.training, f"{type(module).__name__} is in training mode"
        if isinstance(module, NexusRouter):  # the cache made after the assignment
            assert not module.expert_embeddings.is_meta
            assert torch.equal(module.expert_embeddings, module.project())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ids = TOKENS
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_load_takes_torch_or_named_dtypes_and_devices(dtype: Any, device: Any, tmp_path: Path) -> None:
    path = save_native(model_of("nexus"), tmp_path / "m")
    model = moecompose.load(path, dtype=dtype, device=device)
    assert model.config.dtype == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"cpu"}


def test_bfloat16_load_equals_float32_load_cast(tmp_path: Path) -> None:
    """Loading in bf16 gives the tensors of the fp32 model cast to bf16, and the logits of
    the old way (a bf16 model the fp32 tensors are copied into)."""
    path = save_native(model_of("nexus"), tmp_path / "m")
    bf16 = moecompose.load(path, dtype=torch.bfloat16)
    cast = moecompose.load(path).to(torch.bfloat16).state_dict()
    assert bf16.state_dict().keys() == cast.keys()
    assert all(torch.equal(bf16.state_dict()[n], t) for n, t in cast.items())
    ids = TOKENS
    with torch.no_grad():
        assert torch.equal(bf16(ids).logits, old_way(path, "bfloat16")(ids).logits)


def test_from_weights_refuses_missing_or_misshapen_tensors() -> None:
    model = model_of()
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match="missing tensors"):
        MoECausalLM.from_weights(model.config, {k: v for k, v in state.items() if "norm" not in k})
    state["lm_head.weight"] = state["lm_head.weight"][:3]
    with pytest.raises(ValueError, match=r"lm_head.weight: expected \(64, 32\), got \(3, 32\)"):
        MoECausalLM.from_weights(model.config, state)


def test_from_weights_uses_the_given_tensors_without_copies() -> None:
    model = model_of()
    state = model.state_dict()
    again = MoECausalLM.from_weights(model.config, state)
    ptrs = {name: t.data_ptr() for name, t in state.items()}
    assert all(t.data_ptr() == ptrs[name] for name, t in again.state_dict().items())


EXPORTS = {
    "mixtral": "experts: [code, law], router: {kind: topk, k: 2}",
    "qwen2_moe": "shared: seed, experts: [code, law], router: {kind: topk, k: 1}",
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(EXPORTS))
def test_exports_load_as_before_in_float32_and_bfloat16(fmt: str, write_spec, tmp_path: Path) -> None:
    """Per-expert tensors read straight into their stacked tensors, across shards, give
    the model the old way gave (renamed and stacked in memory, then copied in)."""
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{seed: $seed, code: $code, law: $law}}
        layers:
          - select: all
            ffn: {{{EXPORTS[fmt]}}}
        output: {{format: {fmt}, max_shard_size: 200KB}}
        """
    )
    out = moecompose.build(spec, tmp_path / fmt).path
    assert len(weight_files(out)) > 1
    for dtype in (None, "bfloat16"):
        new, old = moecompose.load(out, dtype=dtype), old_way(out, dtype)
        assert new.state_dict().keys() == old.state_dict().keys()
        assert all(torch.equal(t, old.state_dict()[n]) for n, t in new.state_dict().items())
        with torch.no_grad():
            assert torch.equal(new(IDS).logits, old(IDS).logits)


# --------------------------------------------------------------------------- train / eval


def projection(model: MoECausalLM) -> NexusRouter:
    return next(m for m in model.modules() if isinstance(m, NexusRouter))


def test_train_mode_recomputes_the_nexus_projection_and_eval_reads_its_cache(tmp_path: Path) -> None:
    model = moecompose.load(save_native(model_of("nexus"), tmp_path / "m"))
    router = projection(model)
    assert not router.training
    torch.testing.assert_close(router.expert_embeddings, router.project(), rtol=0, atol=0)
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    for p in (router.w1.weight, router.w2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():  # an optimiser step in train mode: the next forward sees it
        router.w2.weight.mul_(3.0)
        trained = model(TOKENS).logits
    model.eval()
    assert torch.equal(router.expert_embeddings, router.project())  # refreshed on .eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, trained)
        router.w2.weight.mul_(2.0)  # in eval mode the cache is what forward reads
        assert torch.equal(model(TOKENS).logits, trained)
        router.refresh()
        assert not torch.equal(model(TOKENS).logits, trained)


# --------------------------------------------------------------------------- trainable exports


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_exported_trainable_router_loads_with_exactly_the_routers_trainable(
    fmt: str, write_spec, tmp_path: Path
) -> None:
    shared = "shared: seed" if fmt == "qwen2_moe" else ""
    spec = write_spec(
        f"""
        moecompose: 1
        sources: {{seed: $seed, code: $code, law: $law}}
        layers:
          - select: all
            ffn: {{experts: [code, law], router: {{kind: topk, k: 1}}, {shared}}}
        train: [router]
        output: {{format: {fmt}}}
        """
    )
    out = moecompose.build(spec, tmp_path / fmt).path
    config = json.loads((out / "config.json").read_text())
    routers = [f"model.layers.{i}.mlp.router.weight" for i in range(4)]
    assert config["model_type"] == fmt
    assert config["moecompose"]["trainable"] == routers  # native names, as the model's
    plan = json.loads((out / "plan.json").read_text())
    stored = {t["name"] for t in plan["tensors"] if t["trainable"]}
    assert stored == {formats.get(fmt).layout.router.format(i=i) for i in range(4)}
    assert stored <= weights(out).keys()  # the plan names the tensors as stored
    model = moecompose.load(out)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == routers
