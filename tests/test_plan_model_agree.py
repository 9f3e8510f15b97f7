"""The plan and the model agree on every tensor: what the planner writes under native
names is exactly the state dict of the model its config describes (built on the meta
device: no memory, no weights read)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moecompose as mc
from moecompose.model import MoECausalLM

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_native_plan_lists_the_models_state_dict(path: Path) -> None:
    spec = mc.load_spec(path).with_({"output.format": "native"})
    plan = mc.plan(spec)
    with torch.device("meta"):
        model = MoECausalLM.from_config(plan.config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    planned = {t.name: t.shape for t in plan.tensors}
    assert planned == expected
    dtypes = {str(t.dtype).removeprefix("torch.") for t in model.state_dict().values()}
    assert dtypes == {plan.dtype}
