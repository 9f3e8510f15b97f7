"""The ``moecompose`` command. Exit status: 0 success, 2 user error, 1 internal failure."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from moecompose import api
from moecompose.artifact import check_target
from moecompose.errors import MoeComposeError
from moecompose.report import human, print_plan, styled


def plain_console(*, stderr: bool = False, **options: object) -> Console:
    """A console that prints text as it is: no markup, emoji codes or highlighting, so a
    path or name holding ``[/x]`` or ``:smile:`` is shown as written (styles come from
    ``Text`` objects only)."""
    return Console(stderr=stderr, highlight=False, markup=False, emoji=False, **options)  # type: ignore[arg-type]


out = plain_console()
err = plain_console(stderr=True)


def _label(label: str, style: str, rest: str) -> Text:
    """``label`` in ``style``, then plain ``rest``."""
    return styled((label, style), " ", rest)


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


class _Group(click.Group):
    """Turns every user error into one line on stderr and exit status 2."""

    def main(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[arg-type]
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "")
            sys.exit(2)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "moecompose"
            err.print(_label("error:", "bold red", f"{exc.format_message()} "
                             f"(see '{command} --help')"), soft_wrap=True)
            sys.exit(2)
        except click.exceptions.Abort:
            err.print(_label("aborted", "bold red", "(nothing was left half-written)"))
            sys.exit(130)
        except Terminated:
            err.print(_label("terminated", "bold red", "(nothing was left half-written)"))
            sys.exit(128 + signal.SIGTERM)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MoeComposeError as exc:
            err.print(_label("error:", "bold red", exc.format()), soft_wrap=True)
            if err.is_terminal:  # a person reading: show the line and a caret under it
                from moecompose.spec.dsl import file_snippet

                shown = exc.snippet or file_snippet(exc.location)
                if shown:
                    err.print(shown, soft_wrap=True)
            sys.exit(exc.exit_code)


SPEC = click.argument("spec", type=click.Path(path_type=Path, dir_okay=False))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moecompose")
def main() -> None:
    """Compile dense Hugging Face checkpoints into Mixture-of-Experts models.

    A mix spec (YAML, or the terser .moe text syntax) names the dense sources, which layers become MoE, the experts and
    the router. `validate` checks it against the sources' metadata, `plan` shows the
    recipe of every output tensor with parameter and FLOP totals, `build` writes the
    model. `fmt` converts between the two syntaxes, `diff` compares two experiments.
    `train` trains a built model on a recipe's data into a new artifact, `eval` measures
    held-out loss and expert usage per domain. See docs/spec.md, docs/dsl.md and
    docs/training.md for the formats.
    """


@main.command()
@SPEC
def validate(spec: Path) -> None:
    """Check SPEC and its sources (metadata only, no weights are read)."""
    resolved = api.validate(spec)
    moe = len(resolved.moe_layers)
    out.print(
        _label("ok", "green", f"{spec}: {len(resolved.sources)} source(s), "
               f"{resolved.family.name}, {moe}/{len(resolved.layers)} MoE layers"),
        soft_wrap=True,
    )
    for warning in resolved.warnings:
        out.print(_label("warning:", "yellow", warning), soft_wrap=True)


@main.command()
@SPEC
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (the form saved as plan.json).")
@click.option("--tensors", is_flag=True, help="Also list every output tensor with its recipe.")
def plan(spec: Path, as_json: bool, tensors: bool) -> None:
    """Print the upcycling plan of SPEC: per-layer table, totals, the normalised spec."""
    the_plan = api.plan(spec)
    if as_json:
        click.echo(the_plan.to_json(), nl=False)
    else:
        print_plan(the_plan, out, tensors=tensors)


@main.command()
@SPEC
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Artifact folder to write (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing artifact at OUTPUT.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
def build(spec: Path, output: Path, force: bool, quiet: bool) -> None:
    """Plan SPEC, print the plan, and build the model into OUTPUT.

    The build streams tensor by tensor into a temporary folder that is renamed to
    OUTPUT when complete; a failed build leaves nothing behind.
    """
    the_plan = api.plan(spec)
    check_target(the_plan, output, force)
    if not quiet:
        print_plan(the_plan, out)
    with Progress(
        TextColumn("[bold]building[/bold]"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        TextColumn("{task.description}", markup=False), console=err, transient=True, disable=quiet,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        result = api.build(the_plan, output, force=force, progress=progress)
    for warning in result.warnings:
        out.print(_label("warning:", "yellow", warning), soft_wrap=True)
    out.print(
        _label("built", "green", f"{result.path} ({the_plan.format}, "
               f"{human(the_plan.totals.bytes)}B)"),
        soft_wrap=True,
    )


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False))
@click.option("--verify", is_flag=True, help="Re-hash every file against manifest.json.")
def inspect(artifact: Path, verify: bool) -> None:
    """Describe a built ARTIFACT: its plan, format and files."""
    from moecompose.inspect import inspect_artifact

    inspect_artifact(artifact, out, verify=verify)


@main.command()
@SPEC
@click.option("--to", "syntax", type=click.Choice(["yaml", "dsl"]), default=None,
              help="Syntax to write (default: SPEC's own; .moe files are dsl).")
@click.option("--full", is_flag=True, help="Write every default out instead of leaving defaults implicit.")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 if SPEC's text, comments and spacing included, "
                   "differs from the canonical form that fmt would print.")
def fmt(spec: Path, syntax: str | None, full: bool, check: bool) -> None:
    """Print SPEC in canonical form (keys in schema order, defaults left out), keeping its
    comments: each stays with the key or line it was written on, in either syntax."""
    from moecompose.spec import syntax_of
    from moecompose.spec.formatter import format_spec

    the_spec = api.load_spec(spec, check=False)
    text = format_spec(the_spec, syntax or syntax_of(spec), full=full)
    if not check:
        click.echo(text, nl=False)
        return
    if spec.read_text(encoding="utf-8") != text:
        err.print(f"{spec}: not in canonical form (see 'moecompose fmt {spec}')", soft_wrap=True)
        sys.exit(1)
    out.print(_label("ok", "green", f"{spec} is in canonical form"), soft_wrap=True)


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def diff(a: Path, b: Path, as_json: bool) -> None:
    """Compare two experiments: specs (either syntax) or built artifacts.

    Shows the changed settings (per layer range), sources added or removed, and what the
    change costs: parameters, active parameters and FLOPs per token, and the output
    tensors added, removed or made differently. Exit status 1 when they differ, 0 when
    they mean the same model.
    """
    from moecompose.diff import print_diff

    result = api.diff(a, b)
    if as_json:
        click.echo(json.dumps(result.to_data(), indent=2))
    else:
        print_diff(result, out)
    sys.exit(0 if result.equal else 1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the new artifact (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing artifact at OUTPUT.")
def transition(artifact: Path, output: Path, force: bool) -> None:
    """Switch ARTIFACT's Mixture-of-Tokens layers to top-1 routing, into OUTPUT.

    Each token-mixing controller becomes a top-1 token-choice router (weights divided by
    the temperature), so single sequences and batch size 1 work; fine-tune briefly after.
    ARTIFACT is only read.
    """
    from moecompose.derive import transition as run

    path = run(artifact, output, force=force)
    out.print(_label("transitioned", "green", f"{artifact} -> {path}"), soft_wrap=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, file_okay=False))
@click.option("--expert", "expert", required=True, metavar="NAME=PATH",
              help="The new expert's name and its dense checkpoint folder.")
@click.option("--domain-texts", metavar="GLOB",
              help="Documents of the new domain (Nexus: embedded with embed_with; top-k: "
              "the new router row).")
@click.option("--domain-embedding", type=click.Path(path_type=Path, dir_okay=False),
              metavar="FILE", help="The new domain's stored embedding (.safetensors or .npy).")
@click.option("--domain-key", metavar="NAME", help="The tensor to read from --domain-embedding.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A prompt for the new top-k router row (repeatable).")
@click.option("--lam", type=float, default=None,
              help="Share of the new model in merged tensors [default: 1/(m+1), m merged sources].")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the new artifact (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing artifact at OUTPUT.")
def extend(artifact: Path, expert: str, domain_texts: str | None, domain_embedding: Path | None,
           domain_key: str | None, prompts: tuple[str, ...], lam: float | None, output: Path,
           force: bool) -> None:
    """Add one expert to every MoE layer of ARTIFACT, into OUTPUT.

    The router is kept (Nexus: the learned projection, plus the new domain embedding;
    top-k: the existing rows, plus one from --prompt or --domain-texts), the new FFN is
    appended, and non-expert tensors become (1-lam)*current + lam*new. ARTIFACT is only
    read; OUTPUT records the extension in its plan, spec and model card.
    """
    name, sep, path = expert.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=PATH, got {expert!r}", param_hint="--expert")
    result = api.extend(artifact, output, expert=name, source=path, domain_texts=domain_texts,
                        domain_embedding=domain_embedding, domain_key=domain_key,
                        prompts=prompts, lam=lam, force=force)
    for warning in result.warnings:
        out.print(_label("warning:", "yellow", warning), soft_wrap=True)
    out.print(_label("extended", "green", f"{artifact} by '{name}' -> {result.path}"),
              soft_wrap=True)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the trained artifact (must not exist unless --force).")
@click.option("--resume", is_flag=True, help="Continue the run from its newest checkpoint.")
@click.option("--force", is_flag=True,
              help="Replace an existing artifact at OUTPUT, and start over a run that has checkpoints.")
@click.option("--run-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for checkpoints and metrics.jsonl [default: OUTPUT.run beside OUTPUT].")
@click.option("--dry-run", is_flag=True, help="Check the recipe and data, print the run's plan, train nothing.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
def train(recipe: Path, output: Path, resume: bool, force: bool, run_dir: Path | None,
          dry_run: bool, quiet: bool) -> None:
    """Train the artifact RECIPE names on its data, and write the result to OUTPUT.

    Prints the run's plan (tokens, steps, trainable parameters by group, FLOPs), then a
    progress bar with loss, lr, tokens/s and aux loss; every step, evaluation and
    checkpoint is logged as a JSON line in RUN_DIR/metrics.jsonl. OUTPUT is a new artifact
    in the starting artifact's format whose plan.json records the run; the starting
    artifact is only read. See docs/training.md.
    """
    from moecompose.training.loop import RunPlan, prepare
    from moecompose.training.loop import train as run_training
    from moecompose.training.recipe import load_recipe
    from moecompose.training.report import TrainProgress, print_run_plan

    the_recipe = load_recipe(recipe)
    quiet = quiet or os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 prints
    if dry_run:
        print_run_plan(prepare(the_recipe).plan, out)
        return

    def on_plan(run_plan: RunPlan) -> None:
        if not quiet:
            print_run_plan(run_plan, out)

    with TrainProgress(err, the_recipe.total_steps, disable=quiet) as progress:
        result = run_training(the_recipe, output, resume=resume, force=force, run_dir=run_dir,
                              on_event=progress.update, on_plan=on_plan)
    if os.environ.get("RANK", "0") != "0":
        return
    losses = ", ".join(f"{d} {result.initial_eval.get(d, float('nan')):.3f} -> {loss:.3f}"
                       for d, loss in result.final_eval.items())
    out.print(_label("trained", "green", f"{result.artifact.path} ({result.steps} steps, "
                     f"{human(result.tokens)} tokens; held-out loss {losses or 'not measured'})"),
              soft_wrap=True)


@main.command("eval")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--data", "data", multiple=True, metavar="NAME=GLOB",
              help="A domain and a glob of its text or JSONL files (repeatable; all its "
              "documents are evaluated).")
@click.option("--recipe", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Evaluate on a training recipe's held-out data (its split, sequence length "
              "and max_tokens).")
@click.option("--sequence-length", type=click.IntRange(min=2), default=None,
              help="Tokens per evaluated block [default: the recipe's, else min(512, the model's positions)].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Tokens per domain at most [default: the recipe's, else 65536].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Blocks per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write usage heatmaps (and, with --log, loss curves) as PNG files into this "
              "folder (needs matplotlib: pip install 'moecompose[plot]').")
@click.option("--log", "logs", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A training run's metrics.jsonl to plot as loss curves with --plot (repeatable).")
def evaluate(artifacts: tuple[Path, ...], data: tuple[str, ...], recipe: Path | None,
             sequence_length: int | None, max_tokens: int | None, batch_size: int,
             as_json: bool, plot_dir: Path | None, logs: tuple[Path, ...]) -> None:
    """Held-out loss, perplexity, tokens/s and expert usage of each ARTIFACT per domain.

    Several artifacts are shown side by side (e.g. before and after `train`). Expert
    usage is, per routed layer, the share of each domain's routing that each expert
    receives: the picture of BTX or Nexus specialisation.
    """
    if (recipe is None) == (not data):
        raise click.UsageError("give --data NAME=GLOB (repeatable) or --recipe RECIPE")
    results = api.evaluate(list(artifacts), list(data) if data else None, recipe=recipe,
                           sequence_length=sequence_length, max_tokens=max_tokens,
                           batch_size=batch_size)
    if as_json:
        from moecompose.training.evaluate import results_json

        click.echo(results_json(results))
    else:
        from moecompose.training.evaluate import render

        render(results, out)
    if plot_dir is not None:
        from moecompose.training.plots import plot_curves, plot_usage

        plot_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i, result in enumerate(results):
            name = Path(result.artifact).name or f"artifact-{i + 1}"
            written.append(plot_usage(result, plot_dir / f"usage-{i + 1}-{name}.png"))
        if logs:
            written.append(plot_curves(list(logs), plot_dir / "loss-curves.png"))
        for path in written:
            err.print(_label("wrote", "green", str(path)), soft_wrap=True)


@main.command()
@click.option("--recipe", is_flag=True, help="The training recipe's schema instead of the spec's.")
def schema(recipe: bool) -> None:
    """Print the JSON Schema of the YAML spec format (for editor completion)."""
    if recipe:
        from moecompose.training.recipe import Recipe as model
    else:
        from moecompose.spec.schema import Spec as model

    click.echo(json.dumps(model.model_json_schema(by_alias=True), indent=2))


if __name__ == "__main__":
    main()
