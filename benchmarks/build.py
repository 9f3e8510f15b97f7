"""Build benchmark: a 4-expert BTX MoE from four ~300 MB bf16 Llama sources.

Sources: d=1024, 8 layers, f=2816, vocab 32000 (168M parameters each), written once by
transformers into --workdir and reused. Each build runs in its own child process; its
wall time and peak RSS (from wait4) are printed next to a baseline run the same way: a
naive in-memory build that loads every source with safetensors and saves the result with
one `save_file` (what a merge script without streaming does).

    python benchmarks/build.py [--workdir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

DIMS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=32000,
            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
QUICK = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=8000,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
NAMES = ("seed", "code", "law", "math")

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
srcs = [load_file(p + "/model.safetensors") for p in sys.argv[2:]]
out = {}
for name in srcs[0]:
    if ".mlp." in name:
        continue
    out[name] = (sum(s[name].float() for s in srcs) / len(srcs)).to(torch.bfloat16)
layers = sum(1 for n in srcs[0] if n.endswith("mlp.gate_proj.weight"))
for i in range(layers):
    out[f"model.layers.{i}.block_sparse_moe.gate.weight"] = torch.randn(len(srcs), srcs[0]["model.embed_tokens.weight"].shape[1]).to(torch.bfloat16) * 0.02
    for j, s in enumerate(srcs):
        for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"] = s[f"model.layers.{i}.mlp.{p}.weight"].clone()
save_file(out, sys.argv[1] + "/model.safetensors", metadata={"format": "pt"})
"""


def make_sources(workdir: Path, dims: dict[str, int]) -> list[Path]:
    paths = [workdir / "sources" / n for n in NAMES]
    if all((p / "config.json").is_file() for p in paths):
        return paths
    code = textwrap.dedent(f"""
        import torch
        from moecompose.testing import make_dense
        for i, name in enumerate({NAMES!r}):
            make_dense({str(workdir / 'sources')!r} + "/" + name, seed=i, dtype=torch.bfloat16,
                       max_shard_size="10GB", **{dims!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    return paths


def run_child(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:4]} failed")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecompose-bench"))
    parser.add_argument("--quick", action="store_true", help="small sources, for a smoke run")
    args = parser.parse_args()
    workdir = args.workdir / ("quick" if args.quick else "full")
    sources = make_sources(workdir, QUICK if args.quick else DIMS)
    size = sum(f.stat().st_size for p in sources for f in p.glob("*.safetensors")) / 2**20
    spec = workdir / "btx.yaml"
    spec.write_text(
        "moecompose: 1\nname: bench-btx\n"
        f"sources: {{{', '.join(f'{n}: {p}' for n, p in zip(NAMES, sources))}}}\n"
        "layers:\n  - select: all\n    ffn:\n"
        f"      experts: [{', '.join(NAMES)}]\n      router: {{kind: topk, k: 2}}\n"
        "output: {format: mixtral}\n"
    )
    out, naive_out = workdir / "out", workdir / "naive"
    shutil.rmtree(naive_out, ignore_errors=True)
    naive_out.mkdir(parents=True)

    ours = run_child([sys.executable, "-m", "moecompose.cli", "build", str(spec), "-o", str(out),
                      "--force", "--quiet"])
    naive = run_child([sys.executable, "-c", NAIVE, str(naive_out), *map(str, sources)])
    imports = run_child([sys.executable, "-c", "import torch, moecompose.build"])
    built = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20

    print(f"sources: 4 x {size / 4:.0f} MiB bf16; output {built:.0f} MiB")
    print(f"{'':24}{'wall s':>9}{'peak RSS MiB':>15}")
    print(f"{'moecompose build':24}{ours[0]:9.2f}{ours[1]:15.0f}")
    print(f"{'naive in-memory build':24}{naive[0]:9.2f}{naive[1]:15.0f}")
    print(f"{'python + torch import':24}{imports[0]:9.2f}{imports[1]:15.0f}")
    print(f"ratio moecompose / naive: time {ours[0] / naive[0]:.2f}x, peak RSS {ours[1] / naive[1]:.2f}x")
    print(f"RSS above the interpreter with torch loaded: {ours[1] - imports[1]:.0f} MiB")


if __name__ == "__main__":
    main()
