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
>>> mc.train("recipes/demo.yaml", "out/demo-trained")   # a new artifact, trained
>>> mc.evaluate(["out/demo", "out/demo-trained"], ["code=data/code/*.txt"])

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
    from moecompose.training.evaluate import EvalResult
    from moecompose.training.loop import TrainResult
    from moecompose.training.recipe import Recipe

__all__ = ["build", "diff", "evaluate", "extend", "load", "load_spec", "plan", "train", "validate"]

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


def train(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    run_dir: str | Path | None = None,
) -> TrainResult:
    """Train the artifact a recipe names (a ``Recipe`` or a recipe file) and write the
    result to ``out``: a new artifact in the starting artifact's format. Checkpoints and
    ``metrics.jsonl`` go to ``run_dir`` (default ``OUT.run``); ``resume`` continues from
    the newest checkpoint there."""
    from moecompose.training.loop import train as run
    from moecompose.training.recipe import Recipe as RecipeModel
    from moecompose.training.recipe import load_recipe

    the_recipe = recipe if isinstance(recipe, RecipeModel) else load_recipe(recipe)
    return run(the_recipe, out, resume=resume, force=force, run_dir=run_dir)


def evaluate(
    artifacts: str | Path | list[str | Path],
    data: list[str] | dict[str, str | list[str]] | None = None,
    *,
    recipe: Recipe | str | Path | None = None,
    sequence_length: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> list[EvalResult]:
    """Held-out loss, perplexity, tokens/s and expert usage per domain of each artifact.

    ``data``: ``["NAME=GLOB", ...]`` or ``{NAME: GLOB or [GLOB, ...]}`` (every document
    is evaluated), or ``recipe``: a training recipe whose held-out split, sequence length
    and ``eval.max_tokens`` are used."""
    from moecompose.errors import DataError
    from moecompose.training.data import DomainFiles, find_files
    from moecompose.training.evaluate import evaluate_artifacts
    from moecompose.training.loop import recipe_domains
    from moecompose.training.recipe import Recipe as RecipeModel
    from moecompose.training.recipe import load_recipe

    paths = [Path(a) for a in (artifacts if isinstance(artifacts, list) else [artifacts])]
    if recipe is not None:
        the_recipe = recipe if isinstance(recipe, RecipeModel) else load_recipe(recipe)
        return evaluate_artifacts(
            paths, recipe_domains(the_recipe),
            sequence_length=sequence_length or the_recipe.sequence_length,
            max_tokens=max_tokens or the_recipe.eval.max_tokens, batch_size=batch_size,
            held_out=float(the_recipe.held_out), seed=the_recipe.seed,
            text_field=the_recipe.text_field)
    if not data:
        raise DataError("nothing to evaluate on", hint="give data (NAME=GLOB) or a recipe")
    globs: dict[str, list[str]] = {}
    items = data.items() if isinstance(data, dict) else (_domain_glob(d) for d in data)
    for name, pattern in items:
        globs.setdefault(name, []).extend([pattern] if isinstance(pattern, str) else pattern)
    domains = [DomainFiles(name, find_files(patterns, Path.cwd()))
               for name, patterns in globs.items()]
    return evaluate_artifacts(paths, domains, sequence_length=sequence_length,
                              max_tokens=max_tokens or 65536, batch_size=batch_size)


def _domain_glob(text: str) -> tuple[str, str]:
    from moecompose.errors import DataError

    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise DataError(f"expected NAME=GLOB, got {text!r}", hint="e.g. code='data/code/*.py'")
    return name, pattern
