"""What ``moecompose train`` prints: the run's plan before the first step, and a progress
bar with loss, lr, tokens/s and aux loss while it runs."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moecompose.report import add_row, human, styled, table
from moecompose.training.loop import RunPlan


def print_run_plan(plan: RunPlan, console: Console) -> None:
    console.print(styled(("training ", "bold"), str(plan.artifact), f" ({plan.format})"),
                  soft_wrap=True)
    console.print(
        f"{plan.steps:,} steps x {plan.sequences_per_step} sequences = {human(plan.tokens)} tokens, "
        f"about {human(plan.train_flops)} FLOPs", soft_wrap=True)
    params = table("trainable parameters", ["group", "parameters"])
    for group, n in plan.trainable.items():
        add_row(params, group, f"{n:,}")
    add_row(params, "frozen", f"{plan.frozen:,}")
    console.print(params)
    data = table("data", ["domain", "weight", "train tokens", "eval tokens", "documents (train/eval)"])
    for name, d in plan.domains.items():
        docs = d["documents"]
        add_row(data, name, f"{d['weight']:.2f}", f"{d['train_tokens']:,}", f"{d['eval_tokens']:,}",
                     f"{docs[0]}/{docs[1]}")
    console.print(data)
    for name, d in plan.domains.items():
        if d["eval_tokens"] < 2:
            console.print(styled(("warning: ", "yellow"), f"domain '{name}' has no held-out "
                                 "data: it is not evaluated (set held_out or eval_files)"),
                          soft_wrap=True)


class TrainProgress:
    """A rich progress bar fed with the run's log events (``on_event``)."""

    def __init__(self, console: Console, total: int, *, disable: bool = False) -> None:
        self.bar = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}", markup=False), TimeRemainingColumn(),
            console=console, transient=True, disable=disable,
        )
        self.task = self.bar.add_task("", total=total)
        self.disable = disable

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.bar.__exit__(kind, exc, tb)

    def update(self, event: dict[str, Any]) -> None:
        if event["event"] == "train":
            self.bar.update(self.task, completed=event["step"], description=(
                f"loss {event['loss']:.4f}  aux {event['aux_loss']:.4f}  lr {event['lr']:.2e}  "
                f"{human(event['tokens_per_s'])} tok/s"))
        elif event["event"] == "eval" and not self.disable:
            losses = "  ".join(f"{d} {v['loss']:.4f}" for d, v in event["domains"].items())
            self.bar.console.print(f"step {event['step']}: held-out loss {losses}", soft_wrap=True)
