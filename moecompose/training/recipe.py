"""The training recipe, format version 1: what ``moecompose train`` runs, as pydantic
models read from YAML with the spec's error machinery (every mistake is one located
line; unknown keys suggest the closest one).

Paths (``artifact``, data globs) are relative to the recipe file's folder. Defaults follow
the papers' conventions (ALGORITHMS.md): AdamW with no weight decay on norms, biases and
routers, warmup then cosine decay, gradient clipping at 1.0.

This module imports no torch: ``moecompose schema --recipe`` and the CLI's checks read it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, StrictFloat, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from moecompose.errors import Location, SpecError
from moecompose.spec.origin import DataPath, Origin
from moecompose.spec.schema import MAX_INT, Node, SourceName, TrainName

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 1 << 20
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _exponent(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as text: take it as the number it means."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


Number = Annotated[StrictFloat | StrictInt, BeforeValidator(_exponent)]
Globs = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class DomainData(Node):
    """One data domain: text files (one document each) and JSONL files (one document a
    line), chosen by glob patterns."""

    files: Globs = Field(description="Glob patterns of training files (`**` recurses); "
                         "`.jsonl` files hold one JSON object a line with a text field.")
    eval_files: Globs | None = Field(
        None, description="Glob patterns of held-out files; default: `held_out` of the "
        "domain's documents, chosen by the seed.")
    weight: Number = Field(1.0, ge=0, description="Mixture weight: the share of training "
                           "sequences drawn from this domain (normalised over domains).")


class Optimizer(Node):
    """AdamW. Norms, biases and router weights get no weight decay."""

    lr: Number = Field(3e-4, gt=0, description="Peak learning rate.")
    betas: tuple[Annotated[Number, Field(ge=0, lt=1)], Annotated[Number, Field(ge=0, lt=1)]] = \
        Field((0.9, 0.95), description="Adam's beta1, beta2.")
    eps: Number = Field(1e-8, gt=0, description="Adam's epsilon.")
    weight_decay: Number = Field(0.1, ge=0, description="Decoupled weight decay of the "
                                 "matrices (not norms, biases or routers).")


class Schedule(Node):
    """Linear warmup from 0 to ``lr``, then decay to ``min_lr_ratio * lr`` at the last step."""

    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay shape.")
    warmup_steps: StrictInt = Field(0, ge=0, le=MAX_INT, description="Steps of linear warmup.")
    min_lr_ratio: Number = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr.")


class EvalSettings(Node):
    every: StrictInt | None = Field(
        None, ge=1, le=MAX_INT,
        description="Evaluate the held-out data every this many steps (and before the first "
        "and after the last); default: only before and after.")
    max_tokens: StrictInt = Field(65536, ge=1, le=MAX_INT,
                                  description="Held-out tokens per domain per evaluation.")
    batch_size: StrictInt = Field(8, ge=1, le=MAX_INT, description="Sequences per eval batch.")


class CheckpointSettings(Node):
    every: StrictInt | None = Field(
        None, ge=1, le=MAX_INT,
        description="Write a checkpoint every this many steps (`--resume` continues from the "
        "last one); default: none but the final state.")
    keep: StrictInt = Field(2, ge=1, le=MAX_INT, description="Checkpoints kept (newest).")


class Recipe(Node):
    """A training run: the artifact it starts from, the data, and how to train."""

    moecompose_recipe: Literal[1] = Field(description="Recipe format version: 1.")
    artifact: str = Field(min_length=1, description="The artifact to train (a folder `build` "
                          "wrote, native or exported); relative to the recipe's folder.")
    data: Annotated[dict[SourceName, DomainData], Field(min_length=1)] = Field(
        description="Data domains by name.")
    held_out: Number = Field(0.05, ge=0, lt=1, description="Fraction of each domain's "
                             "documents held out for evaluation (domains without eval_files).")
    text_field: str = Field("text", min_length=1, description="The text field of JSONL lines.")
    sequence_length: StrictInt = Field(ge=2, le=MAX_INT, description="Tokens per training "
                                       "sequence; at most the model's max_position_embeddings.")
    batch_tokens: StrictInt = Field(ge=2, le=MAX_INT, description="Tokens per optimizer step "
                                    "(a multiple of sequence_length x grad_accumulation).")
    steps: StrictInt | None = Field(None, ge=1, le=MAX_INT, description="Optimizer steps "
                                    "(give steps or tokens).")
    tokens: StrictInt | None = Field(None, ge=1, le=MAX_INT, description="Training tokens; "
                                     "steps = ceil(tokens / batch_tokens).")
    grad_accumulation: StrictInt = Field(1, ge=1, le=MAX_INT,
                                         description="Micro-batches per optimizer step.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="AdamW settings.")
    schedule: Schedule = Field(default_factory=Schedule, description="Learning-rate schedule.")
    grad_clip: Number | None = Field(1.0, gt=0, description="Clip the global gradient norm "
                                     "to this; empty: no clipping.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16 autocast with fp32 master weights and optimizer.")
    compile: bool = Field(False, description="Train the torch.compile'd model.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train; auto: cuda when available, else cpu.")
    seed: StrictInt = Field(0, ge=0, le=MAX_INT, description="Seeds data order, held-out "
                            "split and every random draw of the run.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation.")
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings,
                                           description="Checkpoints for --resume.")
    train: list[TrainName] | None = Field(
        None, description="Tensor groups that train (the spec's names, e.g. [router]); "
        "default: the artifact's trainable set.")

    _origin: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _budget(self) -> Recipe:
        if self.steps is not None and self.tokens is not None:
            raise PydanticCustomError("budget", "give 'steps' or 'tokens', not both",
                                      {"at": "tokens"})
        if self.steps is None and self.tokens is None:
            raise PydanticCustomError("budget", "the run needs a length: add 'steps: N' or "
                                      "'tokens: N'")
        per_step = self.sequence_length * self.grad_accumulation
        if self.batch_tokens % per_step:
            raise PydanticCustomError(
                "batch_tokens",
                "{b} is not a multiple of sequence_length x grad_accumulation ({p}); "
                "try {fit}", {"b": self.batch_tokens, "p": per_step, "at": "batch_tokens",
                              "fit": max(per_step, round(self.batch_tokens / per_step) * per_step)})
        return self

    @property
    def origin(self) -> Origin:
        if self._origin is None:
            self._origin = Origin.in_memory()
        return self._origin

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return -(-self.tokens // self.batch_tokens)

    @property
    def sequences_per_micro_batch(self) -> int:
        return self.batch_tokens // (self.sequence_length * self.grad_accumulation)

    def locate(self, *path: str | int, key: bool = False) -> Location:
        """Where ``path`` (e.g. ``"data", "code", "files", 0``) is written."""
        return self.origin.locate(tuple(path), key=key)

    def path(self, value: str) -> Path:
        """A path of the recipe, relative to its folder."""
        return (self.origin.base_dir / value).resolve()

    def to_data(self) -> dict[str, Any]:
        """Every field, defaults included, as plain data."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """sha256 of the normalised recipe with absolute paths: what a checkpoint belongs to."""
        data = self.to_data()
        data["artifact"] = str(self.path(self.artifact))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def parse_recipe(text: str, *, file: str | None = None, base_dir: Path | None = None) -> Recipe:
    """Recipe YAML text -> ``Recipe`` (located errors)."""
    from moecompose.spec.validation import validate_as
    from moecompose.spec.yaml_front import read_yaml

    data, origin = read_yaml(text, file, base_dir, what="recipe",
                             empty_hint="start with 'moecompose_recipe: 1' and 'artifact: PATH'")
    if not isinstance(data, dict):
        raise SpecError("a recipe must be a mapping of keys to values",
                        location=origin.locate(()), hint="start with 'moecompose_recipe: 1'")
    _check_version(data, origin)
    recipe = validate_as(Recipe, data, origin)
    recipe._origin = origin
    return recipe


def _check_version(data: dict[Any, Any], origin: Origin) -> None:
    if "moecompose" in data and "moecompose_recipe" not in data:
        raise SpecError("this is a mix spec, not a training recipe",
                        location=origin.locate(("moecompose",), key=True),
                        hint="build it with 'moecompose build'; a recipe starts with "
                        "'moecompose_recipe: 1'")
    version = data.get("moecompose_recipe")
    path: DataPath = ("moecompose_recipe",)
    if type(version) is int and version > RECIPE_VERSION:
        raise SpecError(f"recipe format version {version} is newer than this moecompose reads",
                        location=origin.locate(path), hint="upgrade moecompose")


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; relative paths in it start at its folder."""
    from moecompose.spec import read_document

    path = Path(path)
    text = read_document(path, "recipe", MAX_RECIPE_BYTES,
                         hint="give the path of a training recipe (.yaml)")
    return parse_recipe(text, file=str(path), base_dir=path.parent)
