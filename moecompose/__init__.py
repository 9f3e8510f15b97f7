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


def _register_with_transformers() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained`` read native artifacts: register the
    ``moecompose`` model type (``moecompose.hf``) as soon as transformers is imported, now
    if it is already, without importing it (the front end stays free of torch)."""
    import importlib.abc
    import importlib.util
    import sys

    def register() -> None:
        try:
            from moecompose.hf import register as run

            run()
        except Exception as exc:  # an unsupported transformers must not break its import
            warnings.warn(f"moecompose could not register its model type with transformers: "
                          f"{exc}", stacklevel=2)

    if "transformers" in sys.modules:
        register()
        return

    class AfterTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object, target: object = None) -> object:
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module: object) -> None:
                exec_module(module)  # type: ignore[arg-type]
                register()

            spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, AfterTransformers())


_register_with_transformers()

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
