"""The PyTorch model a native moecompose artifact loads into."""

from moecompose.model.causal_lm import CausalLMOutput, MoECausalLM
from moecompose.model.compile import compile_model
from moecompose.model.config import ModelConfig
from moecompose.model.moe import DISPATCHES, Dispatch

__all__ = [
    "DISPATCHES",
    "CausalLMOutput",
    "Dispatch",
    "MoECausalLM",
    "ModelConfig",
    "compile_model",
]
