"""A sweep from Python: expert count x k x router kind, planned side by side, and the
variants asked for built.

    python examples/sweep.py                                  # plan the grid (demo sources)
    python examples/sweep.py --build e4-k1-topk -o out/sweep  # ... and build one variant
    python examples/sweep.py --base my.moe --experts 2,4,8 --k 1,2 --routers topk,soft

Variants are derived with ``Spec.with_`` (re-validated copies, no text templating) from
the first layer rule of the base spec, whose FFN experts become ``count`` copies of one
source. Combinations the spec cannot express (k above the expert count) are left out;
those moecompose refuses (a router kind it cannot build yet) are listed with the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import moecompose as mc
from moecompose.report import human

BASE = Path(__file__).resolve().parent.parent / "specs" / "sparse_upcycling.moe"


def variants(base: mc.Spec, experts: list[int], ks: list[int], routers: list[str]) -> dict[str, mc.Spec]:
    """The grid, by name ``e{count}-k{k}-{kind}``. Routers without a k (soft,
    token_mixing) appear once per expert count."""
    rule = base.layers[0]
    if rule.ffn is None:
        raise SystemExit("the base spec's first layer rule needs an 'ffn' section")
    current = rule.ffn.experts
    source = getattr(current, "copy_", None) or (current[0] if isinstance(current, list) else next(iter(base.sources)))
    drop = getattr(current, "drop", 0.0)
    out = {}
    for count in experts:
        for kind in routers:
            takes_k = kind in ("topk", "nexus")
            for k in ks if takes_k else ks[:1]:
                if takes_k and k > count:
                    continue
                router: dict[str, Any] = {"kind": kind}
                if takes_k:
                    router["k"] = k
                if kind == "token_mixing":
                    router["group_size"] = 8
                name = f"e{count}-k{k}-{kind}" if takes_k else f"e{count}-{kind}"
                out[name] = base.with_({
                    "layers[0].ffn.experts": {"copy": source, "count": count, "drop": drop},
                    "layers[0].ffn.router": router,
                })
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE, help="base spec (YAML or .moe)")
    parser.add_argument("--experts", type=_ints, default=[2, 4, 8], help="expert counts, e.g. 2,4,8")
    parser.add_argument("--k", type=_ints, default=[1, 2], help="experts per token, e.g. 1,2")
    parser.add_argument("--routers", default="topk,soft", help="router kinds, e.g. topk,soft")
    parser.add_argument("--build", action="append", default=[], metavar="NAME",
                        help="build this variant (repeatable)")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/sweep"),
                        help="folder for the built variants")
    args = parser.parse_args(argv)
    console = Console(highlight=False)

    try:
        base = mc.load_spec(args.base, check=False)
        grid = variants(base, args.experts, args.k, args.routers.split(","))
    except (mc.MoeComposeError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    unknown = [name for name in args.build if name not in grid]
    if unknown:
        console.print(f"[red]error:[/red] no variant {', '.join(unknown)}; the grid has "
                      f"{', '.join(grid)}", soft_wrap=True)
        return 2

    table = Table(title=f"Sweep over {args.base}", title_justify="left")
    for column in ("variant", "params", "active / token", "FLOPs / token", "format", "status"):
        table.add_column(column, justify="left" if column in ("variant", "format", "status") else "right")
    plans = {}
    refusals: dict[str, list[str]] = {}
    for name, spec in grid.items():
        try:
            plan = mc.plan(spec)
        except mc.MoeComposeError as exc:
            table.add_row(name, "", "", "", "", "[yellow]refused[/yellow]")
            refusals.setdefault(exc.message, []).append(name)
            continue
        plans[name] = plan
        t = plan.totals
        table.add_row(name, human(t.params), human(t.active_params), human(t.flops_per_token),
                      plan.format, "ok")
    console.print(table)
    for reason, names in refusals.items():
        console.print(f"[yellow]refused[/yellow] {', '.join(names)}: {reason}", soft_wrap=True)

    for name in args.build:
        if name not in plans:
            console.print(f"[red]error:[/red] variant {name} cannot be built (see the table)")
            return 2
        result = mc.build(plans[name], args.output / name, force=True)
        console.print(f"[green]built[/green] {name} -> {result.path}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
