"""Build benchmark: a 4-expert BTX MoE from four ~300 MB bf16 Llama sources.

Sources: d=1024, 8 layers, f=2816, vocab 32000 (168M parameters each), written once by
transformers into --workdir and reused. Each build runs in its own child process; its
wall time and peak RSS (from wait4) are printed next to a baseline run the same way: a
naive in-memory build that loads every source with safetensors and saves the result with
one `save_file` (what a merge script without streaming does). Then a Nexus build of the
same experts, whose domain embeddings run the seed over texts (layer by layer), against
embedding the same texts with the whole seed model loaded by transformers.

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


NAIVE_EMBED = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
seed, texts = sys.argv[1], sys.argv[2:]
model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(seed)
with torch.no_grad():
    means = [model.model(tok(t, return_tensors="pt").input_ids).last_hidden_state[0].mean(0)
             for t in texts]
print(torch.stack(means).mean(0).norm())
"""


def write_texts(workdir: Path, docs: int, words: int) -> Path:
    """Domain documents of the Nexus build, in words the sources' tokenizer knows."""
    from moecompose.testing import WORDS

    root = workdir / "texts"
    for j, name in enumerate(NAMES[1:]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(docs):
            text = " ".join(WORDS[(7 * k + 3 * j + i * i) % len(WORDS)] for i in range(words))
            (root / name / f"{k}.txt").write_text(text)
    return root


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=None if env is None else {**os.environ, **env})
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

    # Nexus: the same experts, plus domain embeddings the build computes by running the
    # seed over each domain's texts (a fresh cache, so it does), against loading the whole
    # seed model in float32 with transformers to run the same texts.
    texts = write_texts(workdir, docs=4 if args.quick else 16, words=64 if args.quick else 400)
    nexus = workdir / "nexus.yaml"
    nexus.write_text(
        "moecompose: 1\nname: bench-nexus\n"
        f"sources: {{{', '.join(f'{n}: {p}' for n, p in zip(NAMES, sources))}}}\n"
        "embed_with: seed\ndomains:\n"
        + "".join(f"  {n}: {{texts: {texts / n}/*.txt}}\n" for n in NAMES[1:])
        + "layers:\n  - select: all\n    ffn:\n"
        f"      shared: seed\n      experts: [{', '.join(NAMES[1:])}]\n"
        "      router: {kind: nexus}\n"
    )
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    ours_nexus = run_child([sys.executable, "-m", "moecompose.cli", "build", str(nexus), "-o",
                            str(workdir / "nexus-out"), "--force", "--quiet"],
                           env={"MOECOMPOSE_CACHE_DIR": str(cache)})
    docs = sorted(str(f) for f in texts.glob("*/*.txt"))
    naive_embed = run_child([sys.executable, "-c", NAIVE_EMBED, str(sources[0]),
                             *[Path(f).read_text() for f in docs]])
    print(f"\nNexus build embedding {len(docs)} documents with the seed (fresh cache):")
    print(f"{'moecompose build':24}{ours_nexus[0]:9.2f}{ours_nexus[1]:15.0f}")
    print(f"{'whole-model embedding':24}{naive_embed[0]:9.2f}{naive_embed[1]:15.0f}"
          "   (transformers, fp32, the texts only)")
    print(f"ratio: peak RSS {ours_nexus[1] / naive_embed[1]:.2f}x")


if __name__ == "__main__":
    main()
