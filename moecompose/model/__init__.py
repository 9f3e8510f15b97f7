"""The PyTorch model a native moecompose artifact loads into."""

from moecompose.model.attention_mix import ATTENTION_IMPLS, AttentionImpl, MixtureOfAttention
from moecompose.model.cache import KVCache, StaticKVCache
from moecompose.model.causal_lm import CausalLMOutput, MoECausalLM
from moecompose.model.compile import compile_model
from moecompose.model.config import ModelConfig
from moecompose.model.moe import DISPATCHES, Dispatch
from moecompose.model.nexus import NexusRouter

__all__ = [
    "ATTENTION_IMPLS",
    "DISPATCHES",
    "AttentionImpl",
    "CausalLMOutput",
    "Dispatch",
    "KVCache",
    "MixtureOfAttention",
    "MoECausalLM",
    "ModelConfig",
    "NexusRouter",
    "StaticKVCache",
    "compile_model",
]
