"""moecompose: compile dense transformer checkpoints into Mixture-of-Experts models."""

import warnings

# NumPy is not a dependency: torch's notice that it is missing says nothing to our users.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

# Submodules named like API functions are loaded first, so the names below are the functions
# (a submodule imported later would not rebind them).
import moecompose.build  # noqa: E402
import moecompose.diff  # noqa: E402
import moecompose.extend  # noqa: E402, F401
from moecompose.api import build, diff, evaluate, extend, load, plan, train, validate  # noqa: E402
from moecompose.errors import (  # noqa: E402
    BuildError,
    DataError,
    MoeComposeError,
    SourceError,
    SpecError,
)
from moecompose.spec import Spec, dump_yaml, load_spec, parse_spec  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "DataError",
    "MoeComposeError",
    "SourceError",
    "Spec",
    "SpecError",
    "build",
    "diff",
    "dump_yaml",
    "evaluate",
    "extend",
    "load",
    "load_spec",
    "parse_spec",
    "plan",
    "train",
    "validate",
]
