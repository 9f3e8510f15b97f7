"""The Python API end to end: load a spec, compare variants' plans, build, load, run.

    python examples/quickstart.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import moecompose as mc

SPECS = Path(__file__).resolve().parent.parent / "specs"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/quickstart")
    spec = mc.load_spec(SPECS / "demo.yaml")
    for k in (1, 2, 3):
        plan = mc.plan(spec.with_({"layers[0].ffn.router.k": k}))
        t = plan.totals
        print(f"k={k}: {t.params:,} params, {t.active_params:,} active, {t.flops_per_token:,} FLOPs/token")
    result = mc.build(spec, out, force=True)
    model = mc.load(result.path)
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    with torch.no_grad():
        output = model(ids)
    print(f"built {result.path}; logits {tuple(output.logits.shape)}, aux loss {output.aux_loss.item():.4f}")


if __name__ == "__main__":
    main()
