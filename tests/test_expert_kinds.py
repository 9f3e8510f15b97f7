"""An expert kind written as a mapping declares, on its spec node, what the checks and the
resolver need (`spec/schema.py`); these tests pin those declarations and that the list
form and the mapping forms answer alike."""

from __future__ import annotations

from typing import get_args

import pytest

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
