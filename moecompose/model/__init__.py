"""The PyTorch model a native moecompose artifact loads into.

The names below are imported on first use, so that `moecompose.model.config` (the typed
config, which the planner builds) imports without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {  # name -> the submodule that defines it
    "ATTENTION_IMPLS": "attention_mix",
    "AttentionImpl": "attention_mix",
    "MixtureOfAttention": "attention_mix",
    "KVCache": "cache",
    "StaticKVCache": "cache",
    "CausalLMOutput": "causal_lm",
    "MoECausalLM": "causal_lm",
    "compile_model": "compile",
    "ModelConfig": "config",
    "DISPATCHES": "moe",
    "Dispatch": "moe",
    "NexusRouter": "routing",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"moecompose.model.{_HOMES[name]}"), name)
