"""``moecompose inspect``: what an artifact is, from its plan and manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rich.console import Console

from moecompose.errors import BuildError
from moecompose.plan.recipe import Plan
from moecompose.report import print_plan, styled


def read_plan(artifact: Path) -> Plan:
    path = artifact / "plan.json"
    if not path.is_file():
        raise BuildError(f"{artifact} has no plan.json", hint="is this a moecompose artifact?")
    try:
        return Plan.from_data(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BuildError(f"{path} is corrupted: {exc}") from None


def verify_files(artifact: Path) -> list[str]:
    """Files whose sha256 differs from manifest.json (or that are missing)."""
    path = artifact / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        listed = dict(manifest["files"])
    except FileNotFoundError:
        raise BuildError(f"{artifact} has no manifest.json", hint="nothing to verify against") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BuildError(f"{path} is corrupted: {exc}") from None
    bad = []
    for name, digest in listed.items():
        path = artifact / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        if h.hexdigest() != digest:
            bad.append(f"{name} (changed)")
    return bad


def inspect_artifact(artifact: Path, console: Console, *, verify: bool = False) -> None:
    plan = read_plan(artifact)
    print_plan(plan, console)
    files = sorted(p.name for p in artifact.iterdir() if p.is_file())
    console.print(styled(("Files:", "bold"), f" {', '.join(files)}"), soft_wrap=True)
    if verify:
        bad = verify_files(artifact)
        if bad:
            raise BuildError(f"{artifact}: files differ from manifest.json: {', '.join(bad)}")
        console.print(styled(("all files match manifest.json", "green")))
