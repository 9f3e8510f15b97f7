"""``moecompose inspect``: what an artifact is, from its plan and manifest."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from moecompose.artifact import read_plan, verify_files
from moecompose.errors import BuildError
from moecompose.report import derivation_line, print_plan, styled


def inspect_artifact(artifact: Path, console: Console, *, verify: bool = False) -> None:
    plan = read_plan(artifact)
    print_plan(plan, console)
    for step in plan.derivations:
        line = derivation_line(step, "this artifact", step.get("from", "?"))
        console.print(styled(("History:", "bold"), f" {line}"), soft_wrap=True)
    files = sorted(p.name for p in artifact.iterdir() if p.is_file())
    console.print(styled(("Files:", "bold"), f" {', '.join(files)}"), soft_wrap=True)
    if verify:
        bad = verify_files(artifact)
        if bad:
            raise BuildError(f"{artifact}: files differ from manifest.json: {', '.join(bad)}")
        console.print(styled(("all files match manifest.json", "green")))
