from __future__ import annotations

import pytest

from moecompose import parse_spec
from moecompose.spec.schema import CopyExperts, LayerRange, TopKRouter


def test_sparse_upcycling_example_fills_defaults() -> None:
    spec = parse_spec(
        """
moecompose: 1
sources: {base: ./dense/base}
layers:
  - select: {from: 0, to: 4, every: 2}
    ffn:
      experts: {copy: base, count: 8, drop: 0.5}
      router: {kind: topk, k: 2}
"""
    )
    rule = spec.layers[0]
    assert rule.select == LayerRange(**{"from": 0, "to": 4, "every": 2})
    assert rule.ffn is not None
    assert rule.ffn.experts == CopyExperts(copy="base", count=8, drop=0.5)
    assert isinstance(rule.ffn.router, TopKRouter) and rule.ffn.router.normalize is True
    assert rule.ffn.aux_loss.load_balance == 0.01
    assert spec.merge == "average" and spec.seed == 0


def test_spec_equality_ignores_spelling_of_defaults() -> None:
    short = parse_spec("moecompose: 1\nsources: {a: x}\n")
    long = parse_spec("moecompose: 1\nsources: {a: x}\nseed: 0\nmerge: average\nlayers: []\n")
    assert short == long
    assert short != long.with_(seed=1)


def test_with_revalidates() -> None:
    spec = parse_spec("moecompose: 1\nsources: {a: x}\n")
    with pytest.raises(Exception, match="seed"):
        spec.with_(seed=-1)
