"""Artifacts derived from built ones: ``moecompose transition`` (Mixture of Tokens ->
top-1 routing).

A transition is planned the way ``extend`` is: the artifact's recorded spec, with every
token-mixing router turned into ``{kind: topk, k: 1, normalize: true}``, is planned again
from the facts the artifact records (its dense sources need not exist any more), which
gives the new model's config, layer rows, totals and normalised spec. Then every recipe
is rewritten to read the artifact (the input named ``@base``): a copy of its tensor, and
for the router of a transitioned layer its controller scaled by ``1/T``. The new weights
are made by running those recipes, so ``plan.json`` says how each tensor was made. The
source artifact is only read; the new one is written atomically.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

from moecompose.artifact import DOMAINS_FILE, read_json, read_plan, sha256_file
from moecompose.build.executor import build
from moecompose.dtypes import CODES
from moecompose.errors import BuildError, MoeComposeError
from moecompose.extend import BASE
from moecompose.formats import native
from moecompose.plan.planner import TEMPERATURE
from moecompose.plan.planner import plan as make_plan
from moecompose.plan.recipe import Plan, PlannedTensor, Recipe, TensorRef
from moecompose.resolve import recorded_checkpoint, resolve
from moecompose.sources.checkpoint import TOKENIZER_FILES, open_tensors, tensors_fingerprint
from moecompose.sources.safetensors_io import TensorEntry, read_tensor
from moecompose.spec.schema import Spec

TOP1 = {"kind": "topk", "k": 1, "normalize": True}
MAPPING = "router.weight = controller / T; topk k=1, normalize=true"


def transition(artifact: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Turn every Mixture-of-Tokens layer of ``artifact`` into a top-1 token-choice MoE
    layer (router = controller / T) and write the result to ``out``, built from its plan
    by the same executor as any build."""
    artifact, out = Path(artifact).resolve(), Path(out).resolve()
    return build(transition_plan(artifact), out, force=force).path


def transition_plan(artifact: str | Path) -> Plan:
    """The plan of ``artifact`` with its token-mixing layers made top-1 (see the module
    docstring); every recipe reads the artifact."""
    artifact = Path(artifact).resolve()
    if not (artifact / "config.json").is_file():
        raise BuildError(f"{artifact} is not a moecompose artifact", hint="give a folder `build` wrote")
    base = read_plan(artifact)
    config = read_json(artifact, "config.json")
    if config.get("model_type") != "moecompose":
        raise BuildError(f"{artifact} is a {config.get('model_type')} export without token mixing")
    layers = [i for i, layer in enumerate(config["layers"])
              if layer["ffn"].get("router", {}).get("kind") == "token_mixing"]
    if not layers:
        raise BuildError(f"{artifact} has no token-mixing layer", hint="nothing to transition")
    index = open_tensors("the artifact", artifact)
    spec_data = copy.deepcopy(base.spec)
    for rule in spec_data.get("layers", []):
        ffn = rule.get("ffn") or {}
        if ffn.get("router", {}).get("kind") == "token_mixing":
            ffn["router"] = dict(TOP1)
    # Top-1 layers could now be written as a Hugging Face layout; the artifact stays native.
    spec_data["output"]["format"] = base.format
    recorded = copy.deepcopy(spec_data)
    for name in base.domains:  # planned from the artifact's vectors: the texts may be gone
        spec_data["domains"][name] = {"embedding": str(artifact / DOMAINS_FILE), "key": name}
    tokenizer = {f: sha256_file(artifact / f) for f in TOKENIZER_FILES if (artifact / f).is_file()}
    try:
        opened = {name: recorded_checkpoint(name, base.sources[name], config, tokenizer)
                  for name in spec_data["sources"]}
    except (KeyError, TypeError) as exc:
        raise BuildError(f"{artifact}: plan.json and config.json do not fit together: {exc!r}",
                         hint="is this an unmodified moecompose artifact?") from None
    try:
        new = make_plan(resolve(Spec.model_validate(spec_data), opened))
    except MoeComposeError as exc:
        raise type(exc)(f"transitioning {artifact}: {exc.message}", hint=exc.hint) from None
    scales = {native.LAYOUT.router.format(i=i): 1.0 / _temperature(config, index, i)
              for i in layers}
    tensors = tuple(_from_artifact(t, index, scales.get(t.name)) for t in new.tensors)
    dropped = {TEMPERATURE.format(i=i) for i in layers}
    extra = sorted(set(index) - {t.name for t in tensors} - dropped)
    if extra:
        raise BuildError(f"the artifact has tensors its spec does not plan: {', '.join(extra[:3])}",
                         hint="is this an unmodified moecompose artifact?")
    derivation = {
        "operation": "transition",
        "from": str(artifact),
        "from_plan_digest": base.digest(),
        "layers": layers,
        "mapping": MAPPING,
    }
    return replace(
        new,
        tensors=tensors,
        sources={**new.sources, BASE: {"path": str(artifact), "kind": "artifact",
                                       "fingerprint": tensors_fingerprint(index)}},
        tokenizer_source=BASE if tokenizer else None,
        spec={**new.spec, **({"domains": recorded["domains"]} if "domains" in recorded else {})},
        # The domain vectors are the artifact's; how they were first made is kept under "from".
        domains={name: {**d, "from": base.domains[name]} for name, d in new.domains.items()},
        derivations=(*base.derivations, derivation),
    )


def _temperature(config: dict[str, Any], index: dict[str, TensorEntry], i: int) -> float:
    """T of token-mixing layer ``i``: the learned value the artifact holds, or the config's."""
    router = config["layers"][i]["ffn"]["router"]
    if router.get("learn_temperature"):
        return float(read_tensor(index[TEMPERATURE.format(i=i)]).float())
    return float(router["temperature"])


def _from_artifact(t: PlannedTensor, index: dict[str, TensorEntry], scale: float | None) -> PlannedTensor:
    """``t`` made from the artifact's tensor of the same name (times ``scale``)."""
    entry = index.get(t.name)
    if entry is None or entry.shape != t.shape or entry.dtype != CODES[t.dtype]:
        have = "lacks it" if entry is None else f"has it as {entry.dtype} {list(entry.shape)}"
        raise BuildError(
            f"the transitioned model needs tensor '{t.name}' as {t.dtype} {list(t.shape)}; "
            f"the artifact {have}",
            hint="is this an unmodified moecompose artifact?",
        )
    args = {} if scale is None else {"scale": scale}
    return replace(t, recipe=Recipe("copy", (TensorRef(BASE, t.name),), args))
