"""Build benchmark: a 4-expert BTX MoE from four ~300 MB bf16 Llama sources.

Sources: d=1024, 8 layers, f=2816, vocab 32000 (168M parameters each), written once by
transformers into --workdir and reused. The BTX spec makes every layer MoE, experts
[seed, code, law, math], top-2 router (init: random, N(0, 0.02)), Mixtral output. Each
build runs in its own child process; its wall time and peak RSS (wait4's ru_maxrss: the
child, or a descendant it reaped if larger; neither tool here spawns processes) are
printed side by side:

* moecompose with a fresh hash cache (cold: the manifest hashes the four sources), again
  with it (warm: a rebuild), and with ``merge: {from: seed}``, which builds what
  mergekit-moe builds (it copies every non-expert tensor from its base model; BTX averages
  the four sources' in float32).
* mergekit-moe (found with --mergekit, else on PATH, else skipped) on the same sources:
  base_model seed, the four sources as experts, gate_mode random (no prompts, no model
  run: the match for our random router), experts_per_token 2, dtype bfloat16, Mixtral.
  Once with its defaults, once tuned with its speed options (``TUNED``). Its output is
  checked from headers only: model_type mixtral and as many parameters as ours (it fuses
  each layer's experts into gate_up_proj / down_proj, so it has fewer tensors).
* a naive in-memory build that loads every source with safetensors and saves the result
  with one ``save_file`` (what a merge script without streaming does).

Then a Nexus build of the same experts, whose domain embeddings run the seed over texts
(layer by layer), against embedding the same texts with the whole seed model loaded by
transformers (--no-nexus skips it).

    python benchmarks/build.py [--mergekit PATH] [--workdir DIR] [--quick] [--no-nexus]

mergekit-moe installs with ``pip install -e '.[bench]'`` or in a venv of its own
(benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
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
# mergekit-moe's speed options: asynchronous shard writes need several shards (its default
# shard is 5B parameters, so the whole output is one shard, held in memory until written).
TUNED = ["--async-write", "--write-threads", "2", "--out-shard-size", "100M"]

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


def run_child(argv: list[str], env: dict[str, str] | None = None,
              log: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process. The peak is wait4's ru_maxrss:
    the child's own peak or that of any descendant it waited for, whichever is larger
    (Linux folds reaped children into it), not their sum. With ``log``, the child's
    stdout and stderr go there, and a failure prints its end."""
    start = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=None if log is None else out,
                                env=None if env is None else {**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "" if log is None else "\n" + "".join(log.read_text().splitlines(True)[-20:])
        raise SystemExit(f"{argv[:4]} failed{tail}")
    return wall, usage.ru_maxrss / 1024


def find_mergekit(given: Path | None) -> Path | None:
    """mergekit-moe's executable: --mergekit, else the one on PATH, else none."""
    if given is not None:
        if not (given.is_file() and os.access(given, os.X_OK)):
            raise SystemExit(f"--mergekit {given}: not an executable file")
        return given
    found = shutil.which("mergekit-moe")
    return Path(found) if found else None


def mergekit_config(sources: list[Path]) -> str:
    """mergekit-moe's config for our BTX: the seed as base model (mergekit copies every
    non-expert tensor from it), the four sources as experts, random gates (no prompts,
    no model run), two experts per token, bf16, Mixtral output."""
    experts = "".join(f"  - source_model: {p}\n" for p in sources)
    return (f"base_model: {sources[0]}\ngate_mode: random\ndtype: bfloat16\n"
            f"experts_per_token: 2\narchitecture: mixtral\nexperts:\n{experts}")


def checkpoint_facts(folder: Path) -> tuple[str, int, int]:
    """(config.json model_type, tensor count, parameter count) of a safetensors folder,
    from the config and the files' headers (no weights read)."""
    from moecompose.sources.safetensors_io import read_header

    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "?")
    entries = [e for file in folder.glob("*.safetensors") for e in read_header(file)[0].values()]
    tensors, params = len(entries), sum(e.numel for e in entries)
    return model_type, tensors, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecompose-bench"))
    parser.add_argument("--quick", action="store_true", help="small sources, for a smoke run")
    parser.add_argument("--mergekit", type=Path, metavar="PATH",
                        help="mergekit-moe executable (default: the one on PATH; none: skipped)")
    parser.add_argument("--no-nexus", action="store_true", help="skip the Nexus build")
    args = parser.parse_args()
    mergekit = find_mergekit(args.mergekit)
    workdir = args.workdir / ("quick" if args.quick else "full")
    sources = make_sources(workdir, QUICK if args.quick else DIMS)
    size = sum(f.stat().st_size for p in sources for f in p.glob("*.safetensors")) / 2**20
    spec_sources = f"sources: {{{', '.join(f'{n}: {p}' for n, p in zip(NAMES, sources))}}}\n"
    layers = ("layers:\n  - select: all\n    ffn:\n"
              f"      experts: [{', '.join(NAMES)}]\n      router: {{kind: topk, k: 2}}\n"
              "output: {format: mixtral}\n")
    spec, from_seed = workdir / "btx.yaml", workdir / "btx-from-seed.yaml"
    spec.write_text(f"moecompose: 1\nname: bench-btx\n{spec_sources}{layers}")
    from_seed.write_text(f"moecompose: 1\nname: bench-btx-from-seed\n{spec_sources}"
                         f"merge: {{from: {NAMES[0]}}}\n{layers}")
    out, naive_out = workdir / "out", workdir / "naive"
    shutil.rmtree(naive_out, ignore_errors=True)
    naive_out.mkdir(parents=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)

    # The manifest lists every source file's sha256. The hash cache remembers them by
    # path, inode, size and times: a fresh cache hashes the 4 sources (cold, a first build
    # of new sources), a second build with it reads them once only (warm, a rebuild).
    cache = workdir / "hash-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache_env = {"MOECOMPOSE_CACHE_DIR": str(cache)}

    def build(spec_file: Path) -> tuple[float, float]:
        return run_child([sys.executable, "-m", "moecompose.cli", "build", str(spec_file),
                          "-o", str(out), "--force", "--quiet"], env=cache_env)

    rows = {"moecompose, cold hash cache": build(spec)}
    rows["moecompose, warm hash cache"] = build(spec)
    ours_facts = checkpoint_facts(out)
    rows["moecompose, merge from seed"] = build(from_seed)

    mk_rows: dict[str, tuple[float, float]] = {}
    mk_facts: set[tuple[str, int, int]] = set()
    if mergekit is None:
        print("mergekit-moe: not found, skipped. To compare, pip install -e '.[bench]', or in "
              "a venv of its own:\n  python -m venv ~/venv-mergekit && "
              "~/venv-mergekit/bin/pip install torch==2.13.0 mergekit\n"
              "  python benchmarks/build.py --mergekit ~/venv-mergekit/bin/mergekit-moe")
    else:
        mk_config = workdir / "mergekit-moe.yaml"
        mk_config.write_text(mergekit_config(sources))
        mk_out = workdir / "mergekit-out"
        for label, flags in (("mergekit-moe, defaults", []), ("mergekit-moe, tuned", TUNED)):
            shutil.rmtree(mk_out, ignore_errors=True)
            mk_rows[label] = run_child([str(mergekit), *flags, str(mk_config), str(mk_out)],
                                       log=logs / "mergekit-moe.log")
            mk_facts.add(checkpoint_facts(mk_out))

    rows["naive in-memory build"] = run_child([sys.executable, "-c", NAIVE, str(naive_out),
                                               *map(str, sources)])
    imports = run_child([sys.executable, "-c", "import moecompose.build.executor"])
    built = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20

    print(f"sources: 4 x {size / 4:.0f} MiB bf16; output {built:.0f} MiB")
    print(f"{'':30}{'wall s':>9}{'peak RSS MiB':>15}")
    for label, (wall, rss) in {**rows, **mk_rows}.items():
        print(f"{label:30}{wall:9.2f}{rss:15.0f}")
    print(f"{'python + build code import':30}{imports[0]:9.2f}{imports[1]:15.0f}")
    ours = rows["moecompose, cold hash cache"]
    naive = rows["naive in-memory build"]
    print(f"ratio moecompose (cold) / naive: time {ours[0] / naive[0]:.2f}x, "
          f"peak RSS {ours[1] / naive[1]:.2f}x")
    print(f"RSS above the interpreter with the build code loaded: {ours[1] - imports[1]:.0f} MiB")
    if mk_rows:
        same = {(kind, params) for kind, _, params in mk_facts} == {(ours_facts[0], ours_facts[2])}
        print(f"output check: moecompose {ours_facts[0]}, {ours_facts[1]} tensors, "
              f"{ours_facts[2] / 1e6:.1f}M parameters; mergekit-moe " + "; ".join(
                  f"{kind}, {n} tensors (experts fused), {params / 1e6:.1f}M parameters"
                  for kind, n, params in sorted(mk_facts)) + ("" if same else "  MISMATCH"))
        print(f"ratio moecompose / mergekit-moe{'':10}" + "".join(
            f"{t.split(', ')[1] + ': time':>16}{'RSS':>6}" for t in mk_rows))
        for label in [r for r in rows if r.startswith("moecompose")]:
            mine = rows[label]
            print(f"  {label.split(', ')[1]:38}" + "".join(
                f"{mine[0] / t[0]:15.2f}x{mine[1] / t[1]:5.2f}x" for t in mk_rows.values()))
    if args.no_nexus:
        return

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
