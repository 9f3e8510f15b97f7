"""The model compiles to one graph, once, for every batch size and sequence length."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
from helpers import assert_compiled_inference_matches_eager, assert_compiled_training_matches_eager
from torch._dynamo.utils import counters

from moecompose.model import MoECausalLM
from moecompose.model.compile import supports_shapes_spec

pytestmark = pytest.mark.slow

MOE = {
    "ffn": {
        "kind": "moe",
        "num_experts": 4,
        "intermediate_size": 32,
        "router": {"kind": "topk", "k": 2, "normalize": True},
        "shared_expert": {"intermediate_size": 16, "gate": True},
        "aux_loss": {"load_balance": 0.01, "z_loss": 0.001},
    }
}
CONFIG: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "layers": [{"ffn": {"kind": "dense"}}, MOE],
}
needs_shapes_spec = pytest.mark.skipif(
    not supports_shapes_spec(), reason="shape-stable compile needs torch.compile(shapes_spec=)"
)
SHAPES = [(b, s) for b in (1, 2, 3) for s in (1, 7, 64, 200)]


@pytest.fixture
def model() -> MoECausalLM:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    return MoECausalLM.from_config(copy.deepcopy(CONFIG))


def ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_forward_has_no_graph_breaks(model: MoECausalLM) -> None:
    explanation = torch._dynamo.explain(model)(ids(2, 7))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@needs_shapes_spec
def test_compiled_model_does_not_recompile_for_new_batch_or_sequence_lengths(
    model: MoECausalLM,
) -> None:
    assert_compiled_inference_matches_eager(model, SHAPES, ids)


@needs_shapes_spec
def test_compiled_training_step_matches_eager_without_recompiling(model: MoECausalLM) -> None:
    assert_compiled_training_matches_eager(model, [(2, 7), (1, 1), (3, 33)], ids)


@needs_shapes_spec
def test_sliding_window_model_compiles_once_and_trains_like_eager() -> None:
    """A sliding window (5) builds its mask inside the graph: one graph for lengths below
    and above the window, inference and training alike."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MoECausalLM.from_config({**copy.deepcopy(CONFIG), "sliding_window": 5})
    assert_compiled_inference_matches_eager(model, SHAPES, ids)
    torch._dynamo.reset()
    counters.clear()
    assert_compiled_training_matches_eager(model, [(2, 7), (1, 1), (3, 33)], ids)


@needs_shapes_spec
def test_gemma_block_compiles_once_and_trains_like_eager() -> None:
    """Gemma's options: GeGLU experts, (1+w) sandwich norms, scaled embeddings, q/k norms,
    local and global layers (two masks, two ropes), soft-capped scores (their own op) and
    logits: one training graph for every shape, with eager's loss and gradients. (The
    inference graph differs only in the expert op's no-autograd variant, which the other
    models' inference tests compile.)"""
    gemma = {**copy.deepcopy(CONFIG), "hidden_act": "gelu_tanh", "norm_placement": "sandwich",
             "norm_unit_offset": True, "scale_embeddings": True, "qk_norm": "head",
             "query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0,
             "final_logit_softcapping": 3.0, "sliding_window": 5,
             "layer_types": ["sliding_attention", "full_attention"], "rope_local_base_freq": 100.0}
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MoECausalLM.from_config(gemma)
    assert_compiled_training_matches_eager(model, [(2, 7), (1, 1), (3, 33)], ids)
