"""moecompose: compile dense transformer checkpoints into Mixture-of-Experts models."""

import moecompose.diff  # noqa: F401  (loaded first, so that `diff` below names the function)
from moecompose.api import build, diff, load, plan, validate
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
    "diff",
    "dump_yaml",
    "load",
    "load_spec",
    "parse_spec",
    "plan",
    "validate",
]
