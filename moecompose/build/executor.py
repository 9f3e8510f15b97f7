"""Stage 4: execute a plan into an artifact folder, streaming tensor by tensor.

Output goes to a hidden temporary folder beside the target and is renamed into place only
when every file is complete; any failure removes it. Sources are opened read-only and
are never written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moecompose import formats
from moecompose.artifact import (
    DOMAINS_FILE,
    BuildResult,
    Progress,
    SourceHashes,
    check_free_space,
    check_target,
    manifest,
    sha256_file,
    write_atomically,
    write_text,
)
from moecompose.build.card import model_card
from moecompose.build.recipes import Lookup, produce
from moecompose.dtypes import CODES, nbytes
from moecompose.errors import BuildError, MoeComposeError, ResourceError, SourceError
from moecompose.plan.recipe import Plan, PlannedTensor, TensorRef
from moecompose.sources.checkpoint import (
    TOKENIZER_FILES,
    open_checkpoint,
    open_tensors,
    tensors_fingerprint,
)
from moecompose.sources.safetensors_io import SafetensorsWriter, TensorEntry, all_finite
from moecompose.spec import dump_data

if TYPE_CHECKING:
    from moecompose.build.computed import Computed


def build(plan: Plan, out: str | Path, *, force: bool = False, progress: Progress | None = None) -> BuildResult:
    """Write ``plan``'s artifact to ``out``; refuses an existing ``out`` unless ``force``."""
    out = Path(out).resolve()
    check_target(plan, out, force)
    check_free_space(out, plan.totals.bytes)
    from moecompose.build.computed import compute  # loads the model code: only to build

    lookup = open_sources(plan)
    inputs = SourceHashes(plan)  # for the manifest, alongside the build
    computed = compute(plan, lookup)  # model runs (domain texts, router prompts) come first
    files = write_atomically(
        out, lambda tmp: _write_artifact(plan, tmp, progress, lookup, computed, inputs),
        force=force,
    )
    return BuildResult(out, files, sum(t.numel for t in plan.tensors), tuple(computed.warnings))


def _shards(plan: Plan, max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan.tensors:
        tensor_bytes = tensor.numel * nbytes(tensor.dtype)
        if shards[-1] and size + tensor_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor_bytes
    return shards


def open_sources(plan: Plan) -> Lookup:
    """Index every input that ``plan``'s recipes read (sources, and the artifact a derived
    plan starts from), refusing any whose weights changed since the plan was made. A
    source no recipe reads (a transition's original sources) need not exist any more."""
    entries: dict[str, dict[str, TensorEntry]] = {}
    read = {ref.source for tensor in plan.tensors for ref in tensor.recipe.refs()}
    for name, src in plan.sources.items():
        if name not in read:
            continue
        path = Path(src["path"])
        if src.get("kind") in ("artifact", "checkpoint"):  # a folder of weights, no config
            tensors = open_tensors(name, path)
            fingerprint = tensors_fingerprint(tensors)
        else:
            ckpt = open_checkpoint(name, path)
            tensors, fingerprint = ckpt.tensors, ckpt.fingerprint
        if fingerprint != src["fingerprint"]:
            raise SourceError(
                f"{src.get('kind', 'source')} '{name}' ({path}) changed since the plan was made",
                hint="plan the spec again",
            )
        entries[name] = tensors

    def lookup(ref: TensorRef) -> TensorEntry:
        return entries[ref.source][ref.tensor]

    return lookup


def _write_artifact(
    plan: Plan, tmp: Path, progress: Progress | None, lookup: Lookup, computed: Computed,
    inputs: SourceHashes,
) -> dict[str, str]:
    shards = _shards(plan, int(plan.spec["output"]["max_shard_size"]))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    total = sum(t.numel * nbytes(t.dtype) for t in plan.tensors)
    done = 0
    files: dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        files[file_name] = _write_shard(tmp / file_name, shard, lookup, computed, progress,
                                        done, total)
        done += sum(t.numel * nbytes(t.dtype) for t in shard)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: f for f, shard in zip(names, shards) for t in shard},
        }
        files["model.safetensors.index.json"] = write_text(
            tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n"
        )

    if computed.domains:
        from safetensors.torch import save_file  # domains were computed by a model: torch

        # One vector per domain, reusable as {embedding: OUT/domains.safetensors, key: NAME}.
        save_file(
            {name: v.contiguous() for name, v in sorted(computed.domains.items())},
            tmp / DOMAINS_FILE,
            metadata={"domains": json.dumps(plan.domains, sort_keys=True)},
        )
        files[DOMAINS_FILE] = sha256_file(tmp / DOMAINS_FILE)
    files["config.json"] = write_text(tmp / "config.json", json.dumps(plan.config, indent=2) + "\n")
    files["plan.json"] = write_text(tmp / "plan.json", plan.to_json())
    files["spec.yaml"] = write_text(tmp / "spec.yaml", dump_data(plan.spec))
    if plan.tokenizer_source is not None:
        source_dir = Path(plan.sources[plan.tokenizer_source]["path"])
        for file in TOKENIZER_FILES:
            if (source_dir / file).is_file():
                shutil.copyfile(source_dir / file, tmp / file)
                files[file] = sha256_file(tmp / file)
    for name, text in formats.get(plan.format).files().items():
        files[name] = write_text(tmp / name, text)
    files["README.md"] = write_text(tmp / "README.md", model_card(plan))
    write_text(tmp / "manifest.json", json.dumps(manifest(plan, files, inputs), indent=2) + "\n")
    return files


def _write_shard(
    path: Path, shard: list[PlannedTensor], lookup: Lookup, computed: Computed,
    progress: Progress | None, done: int, total: int,
) -> str:
    """One safetensors file of the artifact; returns its sha256. A cast to float16 beyond
    its range would give Inf: refused, naming the tensor (NumPy's warning is silenced)."""
    writer = SafetensorsWriter(path, [(t.name, CODES[t.dtype], t.shape) for t in shard])
    with np.errstate(over="ignore"):
        try:
            for tensor in shard:
                for chunk in produce(tensor, lookup, computed.value):
                    if tensor.dtype == "float16" and not all_finite(chunk):
                        raise BuildError(
                            f"tensor '{tensor.name}' has values beyond float16's range "
                            "(+-65504): they would be stored as Inf",
                            hint="build in bfloat16 or float32 (output: {dtype: bfloat16})",
                        )
                    writer.write(tensor.name, chunk)
                    done += chunk.nbytes
                if progress is not None:
                    progress(done, total, tensor.name)
        except MoeComposeError:
            writer.abort()
            raise
        except OSError:
            writer.abort()
            raise  # write_atomically names the output and the cause
        except MemoryError:
            writer.abort()
            raise ResourceError(
                f"out of memory computing tensor '{tensor.name}' (shape {list(tensor.shape)}, "
                f"{tensor.numel * nbytes(tensor.dtype):,} bytes)",
                hint="free memory on this machine or build on a larger one",
            ) from None
        except Exception as exc:
            writer.abort()
            raise BuildError(f"failed to compute tensor '{tensor.name}': {exc}") from None
    return writer.close()
