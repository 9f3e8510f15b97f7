"""Stage 4: execute a plan into an artifact folder."""

from moecompose.build.executor import BuildResult, build

__all__ = ["BuildResult", "build"]
