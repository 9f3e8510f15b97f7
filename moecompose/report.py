"""Human-readable views of plans and artifacts, printed with rich."""

from __future__ import annotations

from typing import Any

import yaml
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from moecompose.plan.recipe import Plan


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


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
    console.print(f"[bold]{plan.name}[/bold]: format [cyan]{plan.format}[/cyan] "
                  f"({plan.format_reason}), dtype {plan.dtype}")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")

    layers = Table(title="Layers", title_justify="left")
    for col in ("layers", "attention", "ffn", "experts", "router", "shared"):
        layers.add_column(col)
    for label, row in _layer_groups(plan.layers):
        attention = row.get("attention", "dense")
        if row["ffn"] == "dense":
            layers.add_row(label, attention, "dense", f"merged: {row['merge']}", "", "")
        else:
            drop = f" (drop {row['drop']:g})" if row.get("drop") else ""
            layers.add_row(label, attention, "MoE", f"{row['experts']}{drop}", row["router"],
                           row["shared"] or "")
    console.print(layers)

    if plan.domains:
        domains = Table(title="Domains (Nexus)", title_justify="left")
        for col in ("domain", "from", "width", "fingerprint"):
            domains.add_column(col)
        for name, d in plan.domains.items():
            if d["kind"] == "texts":
                used = len(d["documents"])
                more = f" of {d['matched']}" if d["matched"] > used else ""
                origin = (f"{used}{more} document{'s' if used != 1 else ''} embedded with "
                          f"{d['embed_with']} (<= {d['max_tokens']} tokens each)")
            else:
                origin = d["path"] + (f" [{d['key']}]" if d.get("key") else "")
            domains.add_row(name, origin, str(d["width"]), d["fingerprint"][:12])
        console.print(domains)

    if tensors:
        table = Table(title="Tensors", title_justify="left")
        for col in ("tensor", "shape", "dtype", "recipe", "train"):
            table.add_column(col)
        for tensor in plan.tensors:
            table.add_row(tensor.name, "x".join(map(str, tensor.shape)), tensor.dtype,
                          tensor.recipe.summary(), "yes" if tensor.trainable else "no")
        console.print(table)

    totals = Table(title="Totals", title_justify="left", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("parameters", f"{human(t.params)} ({t.params:,})")
    totals.add_row("active parameters / token", f"{human(t.active_params)} ({t.active_params:,})")
    totals.add_row("trainable parameters", f"{human(t.trainable_params)} ({t.trainable_params:,})")
    totals.add_row(f"forward FLOPs / token (context {t.flops_context})", human(t.flops_per_token))
    totals.add_row("KV cache / token", f"{human(t.kv_cache_bytes_per_token)}B")
    totals.add_row("weights", f"{human(t.bytes)}B")
    totals.add_row("output tensors", str(len(plan.tensors)))
    console.print(totals)

    console.print("[bold]Spec, every default filled in:[/bold]")
    text = yaml.safe_dump(plan.spec, sort_keys=False, default_flow_style=None, width=100)
    console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
