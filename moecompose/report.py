"""Human-readable views of plans and artifacts, printed with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from moecompose.plan.recipe import Plan
from moecompose.spec import dump_data


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from plain strings and ``(text, style)`` pairs: user text is never markup."""
    return Text.assemble(*parts)


def table(title: str, columns: list[str], **options: object) -> Table:
    """A table whose cells wrap (``fold``) instead of being cut with an ellipsis, so
    every path and tensor name stays whole in a narrow terminal or a pipe."""
    out = Table(title=title, title_justify="left", **options)  # type: ignore[arg-type]
    for column in columns:
        justify = "right" if column == "value" else "left"
        out.add_column(column, overflow="fold", justify=justify)  # type: ignore[arg-type]
    return out


def add_row(to: Table, *cells: RenderableType) -> None:
    """Add a row; plain strings are shown as they are, never read as markup."""
    to.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def print_yaml(text: str, console: Console) -> None:
    """YAML text, highlighted on a terminal; long lines wrap, never cropped."""
    if console.is_terminal:
        console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default",
                             word_wrap=True))
    else:
        console.print(Text(text, end=""), soft_wrap=True)


def _layer_groups(rows: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """Consecutive layers with the same description, collapsed into ranges."""
    groups: list[tuple[list[int], dict[str, Any]]] = []
    for row in rows:
        key = {k: v for k, v in row.items() if k != "layer"}
        if groups and groups[-1][1] == key and groups[-1][0][-1] == row["layer"] - 1:
            groups[-1][0].append(row["layer"])
        else:
            groups.append(([row["layer"]], key))
    out = []
    for layers, key in groups:
        label = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        out.append((label, key))
    return out


def print_plan(plan: Plan, console: Console, *, tensors: bool = False) -> None:
    t = plan.totals
    console.print(styled((plan.name, "bold"), ": format ", (plan.format, "cyan"),
                         f" ({plan.format_reason}), dtype {plan.dtype}"), soft_wrap=True)
    for warning in plan.warnings:
        console.print(styled(("warning:", "yellow"), f" {warning}"), soft_wrap=True)

    layers = table("Layers", ["layers", "attention", "ffn", "experts", "router", "shared"])
    for label, row in _layer_groups(plan.layers):
        attention = row.get("attention", "dense")
        if row["ffn"] == "dense":
            add_row(layers, label, attention, "dense", f"merged: {row['merge']}", "", "")
        else:
            drop = f" (drop {row['drop']:g})" if row.get("drop") else ""
            add_row(layers, label, attention, "MoE", f"{row['experts']}{drop}", row["router"],
                    row["shared"] or "")
    console.print(layers)

    if plan.domains:
        domains = table("Domains (Nexus)", ["domain", "from", "width", "fingerprint"])
        for name, d in plan.domains.items():
            if d["kind"] == "texts":
                used = len(d["documents"])
                more = f" of {d['matched']}" if d["matched"] > used else ""
                origin = (f"{used}{more} document{'s' if used != 1 else ''} embedded with "
                          f"{d['embed_with']} (<= {d['max_tokens']} tokens each)")
            else:
                origin = d["path"] + (f" [{d['key']}]" if d.get("key") else "")
            add_row(domains, name, origin, str(d["width"]), d["fingerprint"][:12])
        console.print(domains)

    if tensors:
        listing = table("Tensors", ["tensor", "shape", "dtype", "recipe", "train"])
        for tensor in plan.tensors:
            add_row(listing, tensor.name, "x".join(map(str, tensor.shape)), tensor.dtype,
                    tensor.recipe.summary(), "yes" if tensor.trainable else "no")
        console.print(listing)

    totals = table("Totals", ["what", "value"], show_header=False)
    add_row(totals, "parameters", f"{human(t.params)} ({t.params:,})")
    add_row(totals, "active parameters / token", f"{human(t.active_params)} ({t.active_params:,})")
    add_row(totals, "trainable parameters", f"{human(t.trainable_params)} ({t.trainable_params:,})")
    add_row(totals, f"forward FLOPs / token (context {t.flops_context})", human(t.flops_per_token))
    add_row(totals, "KV cache / token", f"{human(t.kv_cache_bytes_per_token)}B")
    add_row(totals, "weights", f"{human(t.bytes)}B")
    add_row(totals, "output tensors", str(len(plan.tensors)))
    console.print(totals)

    console.print(styled(("Spec, every default filled in:", "bold")))
    print_yaml(dump_data(plan.spec), console)


def derivation_line(step: dict[str, Any], child: str, parent: str) -> str:
    """One line on how ``child`` was made from ``parent``, e.g. ``B trained from A: 150
    steps, 614,400 tokens``."""
    operation = step.get("operation")
    if operation == "train":
        after = step.get("eval_loss_after") or {}
        before = step.get("eval_loss_before") or {}
        losses = ", ".join(f"{d} {before[d]:.3f} -> {loss:.3f}" if d in before else f"{d} {loss:.3f}"
                           for d, loss in after.items())
        return (f"{child} trained from {parent}: {step.get('steps', 0):,} steps, "
                f"{step.get('tokens', 0):,} tokens" + (f"; held-out loss {losses}" if losses else ""))
    if operation == "extend":
        return f"{child} extended from {parent} by expert '{step.get('expert')}'"
    return f"{child} derived from {parent} by {operation}"
