"""Stage 3: the upcycling plan."""

from moecompose.plan.planner import derive_seed, plan
from moecompose.plan.recipe import Plan, PlannedTensor, Recipe, TensorRef, Totals

__all__ = ["Plan", "PlannedTensor", "Recipe", "TensorRef", "Totals", "derive_seed", "plan"]
