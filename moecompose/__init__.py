"""moecompose: compile dense transformer checkpoints into Mixture-of-Experts models."""

# Submodules named like API functions are loaded first, so the names below are the functions.
import moecompose.diff
import moecompose.extend  # noqa: F401
from moecompose.api import build, diff, extend, load, plan, validate
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
    "extend",
    "load",
    "load_spec",
    "parse_spec",
    "plan",
    "validate",
]
