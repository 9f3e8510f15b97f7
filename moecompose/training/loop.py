"""``moecompose train``: train a built artifact on a recipe's data and write the result as
a new artifact.

A run lives in a run folder (default ``OUT.run`` beside the output): ``metrics.jsonl``
(one JSON object per training step, evaluation and checkpoint), ``recipe.yaml``, and
``checkpoints/step-NNNNNN`` (the trainable tensors in native names and fp32 and the
optimizer state as a Distributed Checkpoint, ``state.json`` with the step, the data
position and the RNG state, and for the last step the trained tensors whole), each put in
place by a rename so that a crash or a full disk never leaves a half-written one.
``--resume`` continues from the newest checkpoint, bit-identically on CPU in fp32, on any
number of processes (``training/distributed.py``).

The trained artifact is a plan rewrite, built by the same executor as any build: the
starting artifact's plan, every trained tensor copied from the final checkpoint (the input
``@trained``) and every other tensor from the starting artifact (``@base``), in the
starting artifact's own format and dtype. Its ``plan.json`` records the run (recipe, data
fingerprints, steps, tokens, final metrics) as a ``train`` derivation, which the manifest
repeats with the parent artifact's manifest hash.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moecompose.artifact import (
    BuildResult,
    check_output,
    output_lock,
    read_plan,
    sha256_file,
    stored_domains,
    write_error,
)
from moecompose.errors import BuildError, DataError, SpecError
from moecompose.extend import BASE
from moecompose.formats import Format
from moecompose.formats.native import stored_names
from moecompose.plan.planner import FROZEN_GROUPS
from moecompose.plan.recipe import Plan, PlannedTensor, Recipe, TensorRef
from moecompose.sources.checkpoint import TOKENIZER_FILES, open_tensors, tensors_fingerprint
from moecompose.training.data import BatchStream, Corpus, DomainFiles, TextTokenizer, find_files
from moecompose.training.distributed import (
    World,
    full_trainable,
    load_state,
    local_bytes,
    save_state,
    shard,
    sync_gradients,
)
from moecompose.training.recipe import Recipe as TrainRecipe

if TYPE_CHECKING:
    from moecompose.model import MoECausalLM
    from moecompose.model.config import ModelConfig

TRAINED = "@trained"  # the final checkpoint of the run, as a plan input
CHECKPOINTS = "checkpoints"
Event = dict[str, Any]
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class TrainResult:
    artifact: BuildResult
    run_dir: Path
    steps: int
    tokens: int
    initial_eval: dict[str, float]  # domain -> held-out loss before training
    final_eval: dict[str, float]  # domain -> held-out loss after training


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, shown before it starts."""

    artifact: Path
    format: str
    steps: int
    tokens: int
    sequences_per_step: int
    trainable: dict[str, int]  # group -> trainable parameters
    frozen: int
    train_flops: float  # about 3x the forward FLOPs of the trained tokens
    domains: dict[str, dict[str, Any]]  # name -> {weight, train_tokens, eval_tokens, documents}


# ------------------------------------------------------------------------------ setup


@dataclass
class _Run:
    """Everything resolved from a recipe before the first step."""

    recipe: TrainRecipe
    artifact: Path
    base_plan: Plan
    fmt: Format
    config: ModelConfig
    corpus: Corpus
    trainable: tuple[str, ...]  # native parameter names
    groups: dict[str, str]  # native name -> plan group
    plan: RunPlan


def _artifact_path(recipe: TrainRecipe) -> Path:
    path = recipe.path(recipe.artifact)
    if not (path / "config.json").is_file() or not (path / "plan.json").is_file():
        raise SpecError(f"artifact: {path} is not a moecompose artifact",
                        location=recipe.locate("artifact"),
                        hint="give a folder that 'moecompose build' wrote")
    return path


def _native_groups(plan: Plan, fmt: Format, config: ModelConfig) -> dict[str, str]:
    """Native tensor name -> the plan group of the tensor(s) it is stored as."""
    group = {t.name: t.group for t in plan.tensors}
    out = dict(group)
    for native, stored in stored_names(fmt.layout, config.layers).items():
        names = stored if isinstance(stored, tuple) else (stored,)
        for name in names:
            out.pop(name, None)
        out[native] = group[names[0]]
    return out


def _trainable(recipe: TrainRecipe, groups: dict[str, str], params: set[str],
               default: tuple[str, ...] | None) -> tuple[str, ...]:
    if recipe.train is None:
        names = default if default is not None else tuple(sorted(params))
        return tuple(n for n in names if n in params)
    wanted = set(recipe.train)
    chosen = tuple(sorted(
        n for n, g in groups.items()
        if n in params and g not in FROZEN_GROUPS and ("all" in wanted or g in wanted)
    ))
    if not chosen:
        present = sorted({g for n, g in groups.items() if n in params})
        raise SpecError(f"train: {', '.join(recipe.train)} selects no tensor of this model",
                        location=recipe.locate("train"),
                        hint=f"groups in this model: {', '.join(present)}")
    return chosen


def recipe_domains(recipe: TrainRecipe) -> list[DomainFiles]:
    """The recipe's data domains with their globs expanded (located errors)."""
    out = []
    for name, d in recipe.data.items():
        base = recipe.origin.base_dir
        train = find_files(d.files, base, where=recipe.locate("data", name, "files"))
        evals = () if d.eval_files is None else find_files(
            d.eval_files, base, where=recipe.locate("data", name, "eval_files"))
        out.append(DomainFiles(name, train, evals, float(d.weight)))
    if not any(d.weight > 0 for d in out):
        raise SpecError("data: every domain has weight 0", location=recipe.locate("data"),
                        hint="give at least one domain a positive weight")
    return out


def prepare(recipe: TrainRecipe) -> _Run:
    """Check the recipe against its artifact and data, and tokenise the data."""
    from moecompose.loader import artifact_config

    artifact = _artifact_path(recipe)
    base_plan = read_plan(artifact)
    fmt, config = artifact_config(artifact)
    if recipe.sequence_length > config.max_position_embeddings:
        raise SpecError(
            f"sequence_length {recipe.sequence_length} is longer than the model's "
            f"{config.max_position_embeddings} positions", location=recipe.locate("sequence_length"),
            hint=f"use at most {config.max_position_embeddings}")
    tokenizer = TextTokenizer.from_artifact(artifact, config.eos_token_id)
    corpus = Corpus.load(recipe_domains(recipe), tokenizer, held_out=float(recipe.held_out),
                         seed=recipe.seed, text_field=recipe.text_field)
    for name, stream in (*corpus.train.items(), *corpus.eval.items()):
        if stream.numel() and int(stream.max()) >= config.vocab_size:
            raise DataError(
                f"domain '{name}': the tokenizer of {artifact} gives token id {int(stream.max())}, "
                f"beyond the model's vocabulary of {config.vocab_size}",
                hint="the artifact's tokenizer does not match its model")
    groups = _native_groups(base_plan, fmt, config)
    params = set(_parameter_names(config))
    trainable = _trainable(recipe, groups, params, config.trainable)
    per_group: dict[str, int] = {}
    shapes = _parameter_shapes(config)
    for name in trainable:
        per_group[groups.get(name, "other")] = per_group.get(groups.get(name, "other"), 0) + \
            math.prod(shapes[name])
    steps = recipe.total_steps
    tokens = steps * recipe.batch_tokens
    frozen = sum(math.prod(s) for n, s in shapes.items() if n not in set(trainable))
    weights = {d: float(recipe.data[d].weight) for d in recipe.data}
    total_weight = sum(weights.values())
    plan = RunPlan(
        artifact=artifact, format=fmt.name, steps=steps, tokens=tokens,
        sequences_per_step=recipe.batch_tokens // recipe.sequence_length,
        trainable=dict(sorted(per_group.items())), frozen=frozen,
        train_flops=3.0 * base_plan.totals.flops_per_token * tokens,
        domains={d: {"weight": weights[d] / total_weight,
                     "train_tokens": int(corpus.train[d].numel()),
                     "eval_tokens": int(corpus.eval[d].numel()),
                     "documents": list(corpus.documents[d])} for d in recipe.data},
    )
    return _Run(recipe, artifact, base_plan, fmt, config, corpus, trainable, groups, plan)


def _meta_model(config: ModelConfig) -> MoECausalLM:
    from moecompose.model import MoECausalLM

    with torch.device("meta"):
        return MoECausalLM(config)


def _parameter_names(config: ModelConfig) -> list[str]:
    return [n for n, _ in _meta_model(config).named_parameters()]


def _parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in _meta_model(config).named_parameters()}


# ---------------------------------------------------------------------- optimisation


def lr_at(step: int, recipe: TrainRecipe) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then decay to ``min_lr_ratio * lr`` at the last step."""
    s, total, lr = recipe.schedule, recipe.total_steps, float(recipe.optimizer.lr)
    if step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return lr
    span = max(1, total - s.warmup_steps - 1)
    progress = min(1.0, (step - s.warmup_steps) / span)
    low = float(s.min_lr_ratio)
    if s.kind == "linear":
        return lr * (1.0 - (1.0 - low) * progress)
    return lr * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: MoECausalLM, recipe: TrainRecipe, groups: dict[str, str]
                   ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices only, none on norms,
    biases (1-D tensors) and routers."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or groups.get(name) == "router":
            no_decay.append(p)
        else:
            decay.append(p)
    o = recipe.optimizer
    param_groups = [g for g in (
        {"params": decay, "weight_decay": float(o.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    return torch.optim.AdamW(param_groups, lr=float(o.lr), betas=tuple(map(float, o.betas)),
                             eps=float(o.eps), fused=True)


# ----------------------------------------------------------------------- checkpoints


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int,
                    world: World, final: dict[str, torch.Tensor] | None = None) -> Path:
    """Checkpoint ``step`` (a collective: every rank writes its shards): the trainable
    parameters and optimizer state as a Distributed Checkpoint (``dcp/``), ``state.json``
    (the step, the data position, the RNG), and with ``final`` the trained tensors whole
    (``model.safetensors``, what the trained artifact copies). Written into a hidden folder
    renamed into place, and only then are checkpoints beyond the newest ``keep`` removed:
    a failed write (a full disk) leaves every earlier checkpoint as it was."""
    folder = run_dir / CHECKPOINTS
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.partial"

    def make() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def finish() -> None:
        if final is not None:
            from safetensors.torch import save_file

            save_file(final, tmp / "model.safetensors")
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        for old in _checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    try:
        world.on_main(_writing(make, target))
        world.barrier()
        try:
            save_state(tmp / "dcp", model, optimizer)
        except OSError as exc:
            raise write_error(exc, target) from None
        world.barrier()
        world.on_main(_writing(finish, target))
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _writing(work: Callable[[], None], target: Path) -> Callable[[], None]:
    """``work``, with a failed write reported as one line naming ``target``."""

    def run() -> None:
        try:
            work()
        except OSError as exc:
            raise write_error(exc, target) from None

    return run


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     world: World) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
        load_state(path / "dcp", model, optimizer)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BuildError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}",
                         hint="resume with the recipe the run started with, or remove the "
                         "checkpoint to resume from the one before") from None
    if world.size == state.get("world_size", 1):
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    else:  # another number of ranks: each rank's draws start anew, from the seed and step
        torch.manual_seed(hash((state["step"], world.rank)) & 0x7FFFFFFF)
    return state


# ----------------------------------------------------------------------------- the run


def _log(handle: Any, on_event: OnEvent | None, event: Event) -> None:
    """One log line (rank 0 only: other ranks have no handle)."""
    if handle is None:
        return
    handle.write(json.dumps(event) + "\n")
    handle.flush()
    if on_event is not None:
        on_event(event)


def _evaluate(model: MoECausalLM, run: _Run, step: int) -> Event:
    from moecompose.training.evaluate import evaluate

    blocks = {d: run.corpus.eval_blocks(d, run.recipe.sequence_length, run.recipe.eval.max_tokens)
              for d in run.recipe.data if run.corpus.eval[d].numel() > 1}
    was_training = model.training
    result = evaluate(model, blocks, batch_size=run.recipe.eval.batch_size,
                      artifact=str(run.artifact))
    model.train(was_training)
    return {"event": "eval", "step": step,
            "domains": {d: {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}
                        for d, r in result.domains.items()}}


def default_run_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.run"


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after ``step`` (written before a crash)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            break  # a line cut by the crash
    path.write_text("".join(f"{line}\n" for line in kept))


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module) -> Iterator[None]:
    model.train()
    try:
        yield
    finally:
        model.eval()


def train(
    recipe: TrainRecipe,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    run_dir: str | Path | None = None,
    on_event: OnEvent | None = None,
    on_plan: Callable[[RunPlan], None] | None = None,
) -> TrainResult:
    """Run ``recipe`` and write the trained artifact to ``out`` (see the module docstring).

    Under ``torchrun`` every process calls this: the model is sharded over them, rank 0
    alone prints (``on_plan``, ``on_event``), logs and writes the artifact, and every rank
    returns the same result. ``on_plan`` sees the run's plan before the first step;
    ``on_event`` every log event (``{"event": "train" | "eval" | "checkpoint", ...}``)."""
    out = Path(out).resolve()
    run = prepare(recipe)
    device = torch.device(recipe.device if recipe.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    world = World.from_env(device)
    if recipe.grad_accumulation % world.size:
        raise SpecError(
            f"grad_accumulation {recipe.grad_accumulation} is not a multiple of the "
            f"{world.size} processes", location=recipe.locate("grad_accumulation"),
            hint="each process runs an equal share of the step's micro-batches; set "
            f"grad_accumulation: {world.size * max(1, recipe.grad_accumulation // world.size)} "
            "(batch_tokens stays the global batch)")
    run_dir = Path(run_dir).resolve() if run_dir is not None else default_run_dir(out)
    check_output(out, force, {"the artifact it trains": run.artifact, "the run folder": run_dir})
    if on_plan is not None and world.main:
        on_plan(run.plan)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = output_lock(run_dir) if world.main else contextlib.nullcontext()
    with lock:
        return _train_locked(run, out, run_dir, world, device, resume=resume, force=force,
                             on_event=on_event if world.main else None)


def _start(run_dir: Path, recipe: TrainRecipe, *, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after the run folder is
    checked and prepared."""
    existing = _checkpoint_dirs(run_dir)
    if resume and not existing:
        raise BuildError(f"nothing to resume: {run_dir} has no checkpoint",
                         hint="run without --resume to start the run")
    if existing and not resume:
        if not force:
            raise BuildError(f"{run_dir} holds checkpoints of an earlier run",
                             hint="add --resume to continue it, or --force to start over")
        shutil.rmtree(run_dir / CHECKPOINTS)
    if resume:
        digest = json.loads((existing[-1] / "state.json").read_text()).get("recipe_digest")
        if digest != recipe.digest():
            raise BuildError(f"{existing[-1]} belongs to another recipe",
                             hint="resume with the recipe the run started with, or --force")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(_recipe_yaml(recipe))
    if resume:
        return existing[-1]
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def _train_locked(run: _Run, out: Path, run_dir: Path, world: World, device: torch.device, *,
                  resume: bool, force: bool, on_event: OnEvent | None) -> TrainResult:
    from moecompose.loader import load_artifact
    from moecompose.model.compile import compile_model

    recipe = run.recipe
    checkpoint = world.on_main(lambda: _start(run_dir, recipe, resume=resume, force=force))
    world.barrier()
    if resume and checkpoint is None:  # the other ranks: rank 0 checked it
        checkpoint = _checkpoint_dirs(run_dir)[-1]
    torch.manual_seed(recipe.seed)
    model = load_artifact(run.artifact, dtype=torch.float32, device=device)
    model.set_trainable(run.trainable)
    if world.sharded:
        shard(model, recipe.precision)
    optimizer = make_optimizer(model, recipe, run.groups)
    stream = BatchStream(run.corpus, {d: float(v.weight) for d, v in recipe.data.items()},
                         seq_len=recipe.sequence_length,
                         sequences=recipe.sequences_per_micro_batch, seed=recipe.seed)
    start = 0
    log_path = run_dir / "metrics.jsonl"
    initial: dict[str, float] = {}
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, world)
        stream.load_state_dict(state["data"])
        start = int(state["step"])
        initial = state.get("initial_eval", {})
        if world.main:
            _truncate_log(log_path, start)
    forward = compile_model(model) if recipe.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=recipe.precision == "bf16")
    total, n = recipe.total_steps, recipe.grad_accumulation
    params = [p for p in model.parameters() if p.requires_grad]
    last_eval: Event | None = None
    log = open(log_path, "a") if world.main else None  # noqa: SIM115
    try:
        with _train_mode(model):
            if start == 0:
                last_eval = _evaluate(model, run, 0)
                initial = {d: v["loss"] for d, v in last_eval["domains"].items()}
                _log(log, on_event, last_eval)
            for step in range(start, total):
                began = time.perf_counter()
                lr = lr_at(step, recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sums = [0.0, 0.0]
                mine = range(world.rank, n, world.size)
                for micro in range(n):
                    ids, _domains = stream.next_batch()  # every rank draws every micro-batch
                    if micro not in mine:
                        continue
                    sync_gradients(model, micro == mine[-1])
                    ids = ids.to(device)
                    with autocast:
                        output = forward(ids, labels=ids, return_logits=False)
                    assert output.loss is not None
                    (output.loss * (world.size / n)).backward()
                    sums[0] += float(output.loss.detach())
                    sums[1] += float(output.aux_loss.detach())
                grad_norm = _clip(params, recipe.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum, aux_sum = world.sum(sums)
                seconds = time.perf_counter() - began
                done = step + 1
                event = {"event": "train", "step": done, "loss": (loss_sum - aux_sum) / n,
                         "aux_loss": aux_sum / n, "lr": lr, "grad_norm": grad_norm,
                         "tokens": done * recipe.batch_tokens,
                         "tokens_per_s": recipe.batch_tokens / max(seconds, 1e-9)}
                if step == start:  # what this rank holds, now that the optimizer has state
                    event["state_bytes_per_rank"] = local_bytes(model, optimizer)
                _log(log, on_event, event)
                every = recipe.eval.every
                if done == total or (every is not None and done % every == 0):
                    last_eval = _evaluate(model, run, done)
                    _log(log, on_event, last_eval)
                ckpt_every = recipe.checkpoint.every
                if done == total or (ckpt_every is not None and done % ckpt_every == 0):
                    state = {"step": done, "recipe_digest": recipe.digest(),
                             "data": stream.state_dict(), "rng": torch.get_rng_state().tolist(),
                             "world_size": world.size, "initial_eval": initial}
                    final = full_trainable(model, world) if done == total else None
                    path = save_checkpoint(run_dir, done, model, optimizer, state,
                                           recipe.checkpoint.keep, world, final)
                    _log(log, on_event, {"event": "checkpoint", "step": done, "path": str(path)})
            if last_eval is None or last_eval["step"] != total:
                last_eval = _evaluate(model, run, total)
            last = _checkpoint_dirs(run_dir)[-1]
            if not (last / "model.safetensors").is_file():  # resumed from the final checkpoint
                final = full_trainable(model, world)
                world.on_main(lambda: _write_final(last, final))
    finally:
        if log is not None:
            log.close()
    final_eval = {d: v["loss"] for d, v in last_eval["domains"].items()}

    def write() -> BuildResult:
        from moecompose.build.executor import build

        plan = trained_plan(run, last, final_eval=final_eval, initial_eval=initial)
        return build(plan, out, force=force)

    result = world.on_main(write)
    world.barrier()
    if result is None:  # another rank: rank 0 wrote it
        result = BuildResult(out, {}, 0)
    return TrainResult(result, run_dir, total, total * recipe.batch_tokens, initial, final_eval)


def _write_final(checkpoint: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, checkpoint / "model.safetensors")


def _clip(params: list[torch.nn.Parameter], limit: float | None) -> float:
    """Clip the global gradient norm to ``limit`` (none: only measure it); the norm."""
    if limit is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, float(limit))
    else:
        norm = _grad_norm(params)
    if hasattr(norm, "full_tensor"):  # sharded parameters give a DTensor norm
        norm = norm.full_tensor()
    return float(norm)


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _recipe_yaml(recipe: TrainRecipe) -> str:
    from moecompose.spec import dump_data

    data = recipe.to_data()
    data["artifact"] = str(recipe.path(recipe.artifact))
    return dump_data(data)


# ------------------------------------------------------------------ the trained plan


def trained_plan(run: _Run, checkpoint: Path, *, final_eval: dict[str, float],
                 initial_eval: dict[str, float]) -> Plan:
    """The starting artifact's plan with every trained tensor copied from ``checkpoint``
    (native names; per-expert tensors of an export are slices of the stacked ones) and
    every other tensor from the artifact; the run recorded as a ``train`` derivation."""
    base, artifact = run.base_plan, run.artifact
    trained = set(run.trainable)
    origin: dict[str, tuple[str, int | None]] = {}  # stored name -> (native name, expert)
    for native, stored in stored_names(run.fmt.layout, run.config.layers).items():
        if isinstance(stored, tuple):
            origin.update({name: (native, j) for j, name in enumerate(stored)})
        else:
            origin[stored] = (native, None)

    def rewrite(t: PlannedTensor) -> PlannedTensor:
        native, index = origin.get(t.name, (t.name, None))
        if native in trained:
            args = {} if index is None else {"index": index}
            return replace(t, recipe=Recipe("copy", (TensorRef(TRAINED, native),), args))
        return replace(t, recipe=Recipe("copy", (TensorRef(BASE, t.name),)))

    index = open_tensors("the artifact", artifact)
    ckpt_index = open_tensors("the checkpoint", checkpoint)
    recipe = run.recipe
    derivation = {
        "operation": "train",
        "from": str(artifact),
        "from_plan_digest": base.digest(),
        "from_manifest_sha256": sha256_file(artifact / "manifest.json")
        if (artifact / "manifest.json").is_file() else None,
        "checkpoint": str(checkpoint),
        "steps": recipe.total_steps,
        "tokens": recipe.total_steps * recipe.batch_tokens,
        "trained": sorted(trained),
        "recipe": {**recipe.to_data(), "artifact": str(artifact)},
        "recipe_digest": recipe.digest(),
        "data": {d: {"fingerprint": run.corpus.fingerprints[d],
                     "documents": list(run.corpus.documents[d])} for d in recipe.data},
        "eval_loss_before": initial_eval,
        "eval_loss_after": final_eval,
    }
    has_tokenizer = any((artifact / f).is_file() for f in TOKENIZER_FILES)
    return replace(
        base,
        tensors=tuple(rewrite(t) for t in base.tensors),
        sources={**base.sources,
                 BASE: {"path": str(artifact), "kind": "artifact",
                        "fingerprint": tensors_fingerprint(index)},
                 TRAINED: {"path": str(checkpoint), "kind": "checkpoint",
                           "fingerprint": tensors_fingerprint(ckpt_index)}},
        tokenizer_source=BASE if has_tokenizer else None,
        domains=stored_domains(base, artifact),
        derivations=(*base.derivations, derivation),
    )
