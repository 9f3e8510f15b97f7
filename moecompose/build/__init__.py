"""Stage 4: execute a plan into an artifact folder (``executor.build``).

Nothing is imported here: the build needs torch, and ``import moecompose`` must not."""
