"""The Python API: the same stages the CLI runs, as functions.

>>> import moecompose as mc
>>> spec = mc.load_spec("specs/demo.yaml")  # or a .moe file
>>> p = mc.plan(spec)                       # no weights read
>>> p.totals.active_params
>>> k1 = spec.with_({"layers[0].ffn.router.k": 1})   # a re-validated variant
>>> mc.diff(spec, k1).changes               # [Change('ffn.router.k', 2, 1, layers=(0, 1, 2, 3))]
>>> mc.build(spec, "out/demo", force=True)
>>> model = mc.load("out/demo")             # a torch.nn.Module
>>> mc.extend("out/nexus", "out/nexus+math", expert="math", source="dense/math",
...           domain_texts="data/math/*.txt")  # one more expert, router kept

Every function raises a :class:`~moecompose.errors.MoeComposeError` (located, one line)
for a mistake in the spec, a source or a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moecompose.artifact import BuildResult
from moecompose.plan import Plan
from moecompose.plan import plan as _plan
from moecompose.resolve import Resolved, resolve
from moecompose.spec import Spec, load_spec

if TYPE_CHECKING:
    import torch

    from moecompose.artifact import Progress
    from moecompose.diff import Diff
    from moecompose.model import MoECausalLM

__all__ = ["build", "diff", "extend", "load", "load_spec", "plan", "validate"]

SpecLike = Spec | str | Path


def _spec(spec: SpecLike) -> Spec:
    return spec if isinstance(spec, Spec) else load_spec(spec)


def validate(spec: SpecLike) -> Resolved:
    """Check a spec against its sources' metadata; raises a located error on any problem.

    Planning is part of checking (it is cheap and reads no weights): a plan that cannot be
    made, e.g. a ``train`` group matching no tensor, is a validation error too.
    """
    resolved = resolve(_spec(spec))
    _plan(resolved)
    return resolved


def plan(spec: SpecLike) -> Plan:
    """The upcycling plan of a spec (reads only source metadata)."""
    return _plan(resolve(_spec(spec)))


def build(
    spec: SpecLike | Plan, out: str | Path, *, force: bool = False, progress: Progress | None = None
) -> BuildResult:
    """Plan (unless given a plan) and build the artifact into ``out``."""
    the_plan = spec if isinstance(spec, Plan) else plan(spec)
    from moecompose.build.executor import build as run  # computes weights: torch

    return run(the_plan, out, force=force, progress=progress)


def extend(
    artifact: str | Path,
    out: str | Path,
    *,
    expert: str,
    source: str | Path,
    domain_texts: str | None = None,
    domain_embedding: str | Path | None = None,
    domain_key: str | None = None,
    prompts: list[str] | tuple[str, ...] = (),
    lam: float | None = None,
    force: bool = False,
) -> BuildResult:
    """Add the dense model at ``source`` as expert ``expert`` to every MoE layer of the
    built ``artifact``, writing the result to ``out`` (``artifact`` is only read).

    Nexus layers append the expert's domain embedding (``domain_texts`` or
    ``domain_embedding``) and keep the learned projection; top-k layers keep their rows
    and get a new one from ``prompts`` or ``domain_texts``. Non-expert tensors become
    ``(1 - lam) * current + lam * new``, ``lam = 1/(m+1)`` by default for ``m`` merged
    sources.
    """
    from moecompose.extend import NewExpert
    from moecompose.extend import extend as _extend

    new = NewExpert(
        expert, Path(source), domain_texts,
        None if domain_embedding is None else Path(domain_embedding), domain_key, tuple(prompts),
    )
    return _extend(artifact, out, new, lam=lam, force=force)


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> MoECausalLM:
    """Load any artifact (native or exported) as a ``MoECausalLM`` module in eval mode.

    ``dtype``: ``torch.bfloat16`` or ``"bfloat16"`` (default: the artifact's); ``device``:
    a ``torch.device`` or a string such as ``"cuda"`` (default: CPU). The tensors read
    from the files become the parameters, cast and moved as they are read: no random
    initialisation runs, and memory stays near the model's size.
    """
    from moecompose.loader import load_artifact

    return load_artifact(Path(path), dtype=dtype, device=device)


def diff(a: SpecLike, b: SpecLike) -> Diff:
    """Compare two experiments: specs (``Spec`` objects, YAML or ``.moe`` files) or built
    artifact folders. The result lists changed settings by path (per layer range), sources
    added and removed, and, when both sides' sources can be read, the plans' differences
    in totals and tensors; ``result.equal`` is True when both mean the same model."""
    from moecompose.diff import diff as _diff

    return _diff(a, b)
