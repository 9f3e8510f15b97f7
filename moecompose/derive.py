"""Artifacts derived from built ones: ``moecompose transition`` (Mixture of Tokens ->
top-1 routing). The source artifact is only read; the new one is written atomically and
records where it came from in its plan, spec, manifest and model card."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from moecompose.build.executor import (
    check_output,
    sha256_file,
    versions,
    write_atomically,
    write_text,
)
from moecompose.errors import BuildError
from moecompose.inspect import read_plan
from moecompose.sources.checkpoint import TOKENIZER_FILES


def transition(artifact: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Turn every Mixture-of-Tokens layer of ``artifact`` into a top-1 token-choice MoE
    layer (router = controller / T) and write the result to ``out``."""
    from moecompose.api import load

    artifact, out = Path(artifact).resolve(), Path(out).resolve()
    if not (artifact / "config.json").is_file():
        raise BuildError(f"{artifact} is not a moecompose artifact", hint="give a folder `build` wrote")
    check_output(out, force, {"the artifact": artifact})
    plan = read_plan(artifact)
    config = json.loads((artifact / "config.json").read_text())
    if config.get("model_type") != "moecompose":
        raise BuildError(f"{artifact} is a {config.get('model_type')} export without token mixing")
    layers = [i for i, layer in enumerate(config["layers"])
              if layer["ffn"].get("router", {}).get("kind") == "token_mixing"]
    if not layers:
        raise BuildError(f"{artifact} has no token-mixing layer", hint="nothing to transition")
    model = load(artifact)
    new_config = model.transition_to_topk()
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    spec = yaml.safe_load((artifact / "spec.yaml").read_text())
    for rule in spec.get("layers", []):
        router = (rule.get("ffn") or {}).get("router") or {}
        if router.get("kind") == "token_mixing":
            rule["ffn"]["router"] = {"kind": "topk", "k": 1, "normalize": True}
    derivation = {
        "operation": "transition",
        "from": str(artifact),
        "from_plan_digest": plan.digest(),
        "layers": layers,
        "mapping": "router.weight = controller / T; topk k=1, normalize=true",
    }

    def fill(tmp: Path) -> None:
        files: dict[str, str] = {}
        save_file(dict(sorted(state.items())), tmp / "model.safetensors", metadata={"format": "pt"})
        files["model.safetensors"] = sha256_file(tmp / "model.safetensors")
        files["config.json"] = write_text(tmp / "config.json", json.dumps(new_config, indent=2) + "\n")
        derived = replace(plan, config=new_config, derivations=(*plan.derivations, derivation))
        files["plan.json"] = write_text(tmp / "plan.json", derived.to_json())
        files["spec.yaml"] = write_text(
            tmp / "spec.yaml", yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100)
        )
        for file in TOKENIZER_FILES:
            if (artifact / file).is_file():
                shutil.copyfile(artifact / file, tmp / file)
                files[file] = sha256_file(tmp / file)
        card = (artifact / "README.md").read_text() if (artifact / "README.md").is_file() else ""
        card += (
            f"\n## Transition\n\nLayers {', '.join(map(str, layers))} were switched from "
            "Mixture-of-Tokens mixing to top-1 token-choice routing (router = controller / T). "
            "Outputs differ from the mixing model; fine-tune briefly before use.\n"
        )
        files["README.md"] = write_text(tmp / "README.md", card)
        manifest: dict[str, Any] = {
            "moecompose_manifest": 1,
            "versions": versions(),
            "derived_from": derivation,
            "files": dict(sorted(files.items())),
        }
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")

    write_atomically(out, fill)
    return out
