"""Load benchmark: `moecompose.load` against just reading the artifact's safetensors files.

Source: a dense Llama, d=512, f=1408, 8 layers, vocab 32000, fp32, written once by
transformers into --workdir; artifacts: sparse upcycling of it into 8 experts in every
layer (top-2), built once as `native` (stacked experts) and as `mixtral` (one tensor per
expert, stacked by the loader). For each artifact:

  * time: medians of interleaved repeats, in this process, of reading the files' bytes
    into memory (`Path.read_bytes`, the baseline: what any loader that leaves the model
    in memory must do), `moecompose.load` (meta-device module, tensors read straight
    into the parameters), `moecompose.load(dtype=torch.bfloat16)`, and the loading of
    before (a randomly initialised model, then the tensors copied in), printed as ratios
    to the baseline. (`safetensors.torch.load_file` is no baseline: it maps the file and
    reads nothing until the tensors are used.)
  * peak RSS: each of the same in a child process (its `VmHWM`, which a fork does not
    inherit, unlike `ru_maxrss`), less a child that only imports torch and moecompose
    (the interpreter baseline), as a ratio to the bytes of the model it loads (fp32, or
    bf16 for the bf16 load).

    python benchmarks/load.py [--workdir DIR] [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

DIMS = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=32000,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
QUICK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=256,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FORMATS = ("native", "mixtral")
IMPORTS = ("torch", "safetensors.torch", "moecompose", "moecompose.loader", "moecompose.model")


def build(workdir: Path, dims: dict[str, int]) -> dict[str, Path]:
    """The dense source and one artifact per format (reused when already there)."""
    import moecompose
    from moecompose.testing import make_dense

    source = workdir / "dense"
    if not (source / "config.json").is_file():
        make_dense(source, seed=0, tokenizer=False, max_shard_size="10GB", **dims)
    out = {}
    for fmt in FORMATS:
        path = workdir / fmt
        if not (path / "config.json").is_file():
            spec = workdir / f"{fmt}.yaml"
            spec.write_text(
                f"moecompose: 1\nname: bench-load-{fmt}\nsources: {{base: {source}}}\n"
                "layers:\n  - select: all\n    ffn:\n"
                "      experts: {copy: base, count: 8}\n      router: {kind: topk, k: 2}\n"
                f"output: {{format: {fmt}}}\n"
            )
            moecompose.build(spec, path, force=True)
        out[fmt] = path
    return out


def files(path: Path) -> list[Path]:
    from moecompose.loader import weight_files

    return weight_files(path)


def read_files(path: Path) -> list[bytes]:
    return [file.read_bytes() for file in files(path)]


def load_new(path: Path, dtype: str | None = None):
    import torch

    import moecompose

    return moecompose.load(path, dtype=None if dtype is None else getattr(torch, dtype))


def load_old(path: Path):
    """Loading as it was: `from_config` (random initialisation), then `load_weights`."""
    from safetensors.torch import load_file

    from moecompose import formats
    from moecompose.model import ModelConfig, MoECausalLM

    data = json.loads((path / "config.json").read_text())
    fmt = formats.by_model_type(data["model_type"])
    config = ModelConfig.from_dict(fmt.read_config(data))
    model = MoECausalLM.from_config(config)
    tensors = {}
    for file in files(path):
        tensors.update(load_file(file))
    model.load_weights(fmt.read_tensors(config, tensors))
    return model.eval()


MODES = {
    "read": lambda path: read_files(path),
    "load": lambda path: load_new(path),
    "load bf16": lambda path: load_new(path, "bfloat16"),
    "old load": lambda path: load_old(path),
}


def child(mode: str, path: Path) -> None:
    """Do `mode` once, then print this process's peak RSS in KiB."""
    for module in IMPORTS:
        importlib.import_module(module)
    if mode != "imports":
        MODES[mode](path)
    status = Path("/proc/self/status")
    if status.is_file():
        print(next(line.split()[1] for line in status.read_text().splitlines()
                   if line.startswith("VmHWM:")))
    else:  # no procfs (macOS: bytes); inherits a fork's peak, so read it with care
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(peak // 1024 if sys.platform == "darwin" else peak)


def peak_rss_mib(mode: str, path: Path) -> float:
    """Peak RSS (MiB) of a child process that imports and then does `mode` once."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def model_mib(path: Path, itemsize: int) -> float:
    from moecompose.sources.safetensors_io import read_header

    numel = sum(e.numel for f in files(path) for e in read_header(f)[0].values())
    return numel * itemsize / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecompose-bench-load"))
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    from timing import median_seconds

    workdir = args.workdir / ("quick" if args.quick else "full")
    artifacts = build(workdir, QUICK if args.quick else DIMS)
    repeats = 2 if args.quick else args.repeats
    idle = peak_rss_mib("imports", artifacts["native"])
    print(f"interpreter baseline (python + {', '.join(IMPORTS)}): peak RSS {idle:.0f} MiB")
    for fmt, path in artifacts.items():
        fp32, bf16 = model_mib(path, 4), model_mib(path, 2)
        print(f"\n{fmt}: {path} ({fp32:.0f} MiB fp32)")
        steps = {name: (lambda run=run, path=path: run(path)) for name, run in MODES.items()}
        start = time.perf_counter()
        medians = median_seconds(steps, repeats=repeats, warmup=1)
        print(f"({repeats} interleaved repeats in {time.perf_counter() - start:.0f} s)")
        print(f"{'':12}{'median s':>10}{'x read':>9}{'peak RSS MiB':>15}{'above idle':>12}"
              f"{'x model':>9}")
        for name in MODES:
            rss = peak_rss_mib(name, path)
            size = bf16 if name == "load bf16" else fp32
            print(f"{name:12}{medians[name]:10.3f}{medians[name] / medians['read']:8.2f}x"
                  f"{rss:15.0f}{rss - idle:12.0f}{(rss - idle) / size:8.2f}x")
        print(f"ratios (lower is better): load / read time {medians['load'] / medians['read']:.2f}x,"
              f" old load / read time {medians['old load'] / medians['read']:.2f}x")


if __name__ == "__main__":
    main()
