"""A router kind is declared in three places: its spec node (`spec/schema.py`), its config
(`model/config.py`) and its module (`model/routing.py`). Everything else (the spec checks,
the planner's configs and rows, expert-usage reports) works from the kind's declaration;
these tests pin that the three agree."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from moecompose.model.config import ROUTER_CONFIGS, router_config
from moecompose.model.routing import make_router
from moecompose.spec.schema import ROUTER_KINDS, ROUTER_NODES

# Fields of a config that the planner supplies from the sources, not from the spec.
FROM_SOURCES = {"nexus": {"domain_dim"}}


def test_every_spec_router_kind_has_a_config_of_the_same_kind():
    assert set(ROUTER_CONFIGS) == set(ROUTER_KINDS)


@pytest.mark.parametrize("node", ROUTER_NODES, ids=ROUTER_KINDS)
def test_a_config_takes_its_fields_from_the_spec_node_by_name(node):
    kind = get_args(node.model_fields["kind"].annotation)[0]
    config_fields = set(ROUTER_CONFIGS[kind].model_fields)
    assert config_fields - set(node.model_fields) <= FROM_SOURCES.get(kind, set())


@pytest.mark.parametrize("node", ROUTER_NODES, ids=ROUTER_KINDS)
def test_every_spec_router_node_declares_what_it_routes(node):
    assert node.routes and set(node.routes) <= {"ffn", "attention"}


def test_router_config_keeps_the_model_fields_and_drops_the_spec_only_ones():
    config = router_config("topk", {"kind": "topk", "k": 3, "normalize": False,
                                    "init": "zeros", "init_std": 0.5})
    assert config.model_dump() == {"kind": "topk", "k": 3, "normalize": False}
    mixing = router_config("token_mixing", {"kind": "token_mixing", "group_size": 4,
                                            "batch_size": 8, "temperature": 2.0})
    assert mixing.model_dump() == {"kind": "token_mixing", "group_size": 4,
                                   "temperature": 2.0, "learn_temperature": False}


@pytest.mark.parametrize("kind", sorted(ROUTER_CONFIGS))
def test_make_router_builds_a_module_for_every_config_kind(kind):
    values = {"k": 1, "group_size": 2, "domain_dim": 8}
    module = make_router(16, 4, router_config(kind, {"kind": kind, **values}))
    assert isinstance(module, torch.nn.Module)
    assert any(p.shape[-1] in (16, 8) for p in module.parameters())
