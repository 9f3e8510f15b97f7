"""An expert kind written as a mapping declares, on its spec node, what the checks, the
resolver and the planner need (`spec/schema.py`), and a routed FFN config declares its
module and the tensors it adds (`model/config.py`); these tests pin those declarations,
that they agree, and that the list form and the mapping forms answer alike."""

from __future__ import annotations

from typing import get_args

import pytest
from torch import nn

from moecompose.model.causal_lm import ffn_module
from moecompose.model.config import FFN_CONFIGS, ffn_config
from moecompose.spec.schema import (
    AdapterExperts,
    CopyExperts,
    Experts,
    ExpertsNode,
    expert_sources,
    named_sources,
)

MAPPING_KINDS = [t for t in (get_args(a)[0] for a in get_args(get_args(Experts)[0]))
                 if isinstance(t, type) and issubclass(t, ExpertsNode)]


def test_every_mapping_kind_of_the_union_is_an_experts_node():
    assert set(MAPPING_KINDS) == {CopyExperts, AdapterExperts}


@pytest.mark.parametrize("kind", MAPPING_KINDS, ids=lambda k: k.__name__)
def test_every_kind_names_itself_for_messages(kind):
    assert isinstance(kind.title, str) and kind.title


def test_a_list_names_each_source_at_its_index():
    assert named_sources(["a", "b"]) == [((0,), "a", "expert"), ((1,), "b", "expert")]
    assert expert_sources(["a", "b"]) == [("a", 0.0), ("b", 0.0)]


def test_copies_are_count_experts_of_one_source_with_its_drop_rate():
    copies = CopyExperts.model_validate({"copy": "base", "count": 3, "drop": 0.5})
    assert named_sources(copies) == [(("copy",), "base", "copy source")]
    assert expert_sources(copies) == [("base", 0.5)] * 3
    assert copies.own_ffn


def test_adapters_share_one_ffn_and_name_its_source():
    adapters = AdapterExperts.model_validate({"adapters": "base", "count": 4})
    assert named_sources(adapters) == [(("adapters",), "base", "adapter source")]
    assert expert_sources(adapters) == [("base", 0.0)] * 4
    assert not adapters.own_ffn


@pytest.mark.parametrize("kind", MAPPING_KINDS, ids=lambda k: k.__name__)
def test_every_kind_becomes_a_routed_ffn_config(kind):
    assert kind.ffn in FFN_CONFIGS
    assert ExpertsNode.ffn in FFN_CONFIGS  # a list of sources: FFN experts


ROUTED = {"num_experts": 4, "intermediate_size": 32, "router": {"kind": "topk", "k": 2}}
EXTRA = {"adapters": {"bottleneck": 8}}  # the fields a kind has no default for


@pytest.mark.parametrize("kind", sorted(FFN_CONFIGS))
def test_every_routed_ffn_config_names_a_module(kind):
    module = ffn_module(ffn_config(kind, {**ROUTED, **EXTRA.get(kind, {})}))
    assert issubclass(module, nn.Module)
    assert module.__module__.startswith("moecompose.model.")


def test_token_mixing_names_its_own_module():
    config = ffn_config("moe", {**ROUTED, "router": {"kind": "token_mixing", "group_size": 2}})
    assert ffn_module(config).__name__ == "TokenMixingFFN"
    assert ffn_module(ffn_config("moe", ROUTED)).__name__ == "MoEFFN"


def test_the_config_takes_the_spec_nodes_fields_of_its_own_names():
    node = AdapterExperts.model_validate(
        {"adapters": "base", "count": 4, "bottleneck": 8, "scale": 0.25, "activation": "relu"})
    config = ffn_config(node.ffn, {**node.model_dump(), **ROUTED})
    assert (config.bottleneck, config.scale, config.activation) == (8, 0.25, "relu")
    assert config.num_experts == 4


def test_adapters_add_a_zero_up_projection_and_a_seeded_down_projection():
    config = ffn_config("adapters", {**ROUTED, "bottleneck": 8})
    new = {t.name: t for t in config.new_tensors(hidden_size=16)}
    down, up = (new[f"model.layers.{{i}}.mlp.adapters.{p}_proj"] for p in ("down", "up"))
    assert (down.shape, up.shape) == ((4, 8, 16), (4, 16, 8))
    assert up.init == {"init": "zeros"} and up.seed is None  # the layer starts as its FFN
    assert down.init == {"init": "uniform", "bound": 0.25} and down.seed == "adapter"
    assert ffn_config("moe", ROUTED).new_tensors(hidden_size=16) == []
