"""moecompose: compile dense transformer checkpoints into Mixture-of-Experts models."""

from moecompose.api import build, load, plan, validate
from moecompose.errors import BuildError, MoeComposeError, SourceError, SpecError
from moecompose.spec import Spec, dump_yaml, load_spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "MoeComposeError",
    "SourceError",
    "Spec",
    "SpecError",
    "build",
    "dump_yaml",
    "load",
    "load_spec",
    "parse_spec",
    "plan",
    "validate",
]
