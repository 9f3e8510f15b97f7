"""The artifact's README.md: what the model was built from and how."""

from __future__ import annotations

from moecompose.plan.recipe import Plan


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def model_card(plan: Plan) -> str:
    t = plan.totals
    lines = [
        f"# {plan.name}",
        "",
        "A Mixture-of-Experts model built by moecompose from dense checkpoints.",
        "",
        f"* format: `{plan.format}` ({plan.format_reason})",
        f"* dtype: `{plan.dtype}`",
        f"* parameters: {_count(t.params)} total, {_count(t.active_params)} active per token, "
        f"{_count(t.trainable_params)} trainable",
        f"* forward FLOPs per token: {_count(t.flops_per_token)} (attention at context {t.flops_context})",
        "",
        "## Sources",
        "",
    ]
    for name, src in plan.sources.items():
        lines.append(f"* `{name}`: `{src['path']}`")
    lines += ["", "## Layers", "", "| layer | attention | FFN | experts | router | shared |",
              "|---|---|---|---|---|---|"]
    for row in plan.layers:
        attention = row.get("attention", "dense")
        if row["ffn"] == "dense":
            lines.append(f"| {row['layer']} | {attention} | dense ({row['merge']}) | | | |")
        else:
            drop = f", drop {row['drop']:g}" if row.get("drop") else ""
            lines.append(
                f"| {row['layer']} | {attention} | MoE | {row['experts']}{drop} | {row['router']} "
                f"| {row['shared'] or ''} |"
            )
    if plan.domains:
        lines += ["", "## Domains (Nexus)", ""]
        for name, d in plan.domains.items():
            if d["kind"] == "texts":
                lines.append(f"* `{name}`: {len(d['documents'])} documents embedded with "
                             f"`{d['embed_with']}` (fingerprint `{d['fingerprint'][:12]}`)")
            else:
                lines.append(f"* `{name}`: stored vector `{d['path']}`")
    for step in plan.derivations:
        if step.get("operation") == "transition":
            lines += ["", "## Transition", "",
                      f"Layers {', '.join(map(str, step['layers']))} of `{step['from']}` were "
                      "switched from Mixture-of-Tokens mixing to top-1 token-choice routing "
                      "(router = controller / T). Outputs differ from the mixing model; "
                      "fine-tune briefly before use."]
        if step.get("operation") == "train":
            lines += ["", "## Training", "",
                      f"Trained from `{step['from']}` for {step['steps']:,} steps "
                      f"({step['tokens']:,} tokens) on {', '.join(f'`{d}`' for d in step['data'])}; "
                      f"{len(step['trained'])} tensors trained. Held-out loss per domain: "
                      + ", ".join(f"{d} {step['eval_loss_before'].get(d, float('nan')):.3f} → {v:.3f}"
                                  for d, v in step["eval_loss_after"].items())
                      + ". The recipe is recorded in `plan.json` (`derivations`)."]
        if step.get("operation") == "extend":
            lines += ["", "## Extension", "",
                      f"Expert `{step['expert']}` (`{step['source']}`) was added to `{step['from']}` "
                      f"with lambda = {step['lambda']:.4g}: {step['router']}. Fine-tune briefly "
                      "on a mix of new and old data before use."]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import moecompose",
        "model = moecompose.load('PATH')",
        "```",
        "",
        "The exact recipe of every tensor is in `plan.json`; the normalised spec in `spec.yaml`.",
        "",
    ]
    return "\n".join(lines)
