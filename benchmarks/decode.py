"""Decoding benchmark: greedy generation, eager and compiled, against transformers'
`generate` with its static cache and `torch.compile` on the same export.

Model: a BTX MoE of four dense Llamas (written by transformers into --workdir), 4 experts
top-2 in every layer, exported as Mixtral, so both libraries load the same weights.
Every candidate generates `--new` tokens after a prompt of `--prompt` tokens, at each
batch size; the first call of each (compilation, warmup) is not timed, and the timed
calls of all candidates alternate (`--repeats` rounds), so a slow spell of a shared
machine hits them alike. Printed: new tokens per second of each (median over rounds) and
the ratios that matter: our compiled decoding over our eager one, and over transformers'.

* moecompose eager: `model.generate(ids, n)` (a `StaticKVCache`, eager).
* moecompose compiled: `model.generate(ids, n, forward=compile_model(model))`.
* transformers eager: `generate(do_sample=False)` with its default dynamic cache.
* transformers compiled: `generate(..., cache_implementation="static",
  compile_config=CompileConfig(...))`, transformers' own compiled decoding (its
  `_compile_all_devices` switch turns it on for CPU).

    python benchmarks/decode.py [--workdir DIR] [--quick] [--batch 1 8] [--new N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

DIMS = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, vocab_size=32000,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
QUICK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
SPEC = """\
moecompose: 1
sources: {a: ./dense-0, b: ./dense-1, c: ./dense-2, d: ./dense-3}
layers:
- select: all
  ffn:
    experts: [a, b, c, d]
    router: {kind: topk, k: 2}
output: {format: mixtral}
"""


def setup(workdir: Path, dims: dict[str, int]) -> Path:
    """Four dense sources of one base and their BTX Mixtral export (reused when there)."""
    import moecompose
    from moecompose.testing import make_dense

    for i in range(4):
        if not (workdir / f"dense-{i}" / "config.json").is_file():
            make_dense(workdir / f"dense-{i}", seed=i + 1, base_seed=0, **dims)
    artifact = workdir / "moe"
    if not (artifact / "config.json").is_file():
        (workdir / "spec.yaml").write_text(SPEC)
        moecompose.build(workdir / "spec.yaml", artifact)
    return artifact


Generate = Callable[[torch.Tensor], torch.Tensor]


def candidates(artifact: Path, new: int, max_length: int) -> dict[str, Generate]:
    from transformers import AutoModelForCausalLM, CompileConfig

    import moecompose
    from moecompose.model.compile import compile_model

    ours = moecompose.load(artifact, dtype="float32")
    compiled = compile_model(ours)
    theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
    theirs.config.output_router_logits = False  # the export asks for them (training); decoding
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only

    def hf(**kwargs: object) -> Generate:
        def run(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return theirs.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=0, **kwargs)
        return run

    return {
        "moecompose eager": lambda ids: ours.generate(ids, new, max_length=max_length),
        "moecompose compiled": lambda ids: ours.generate(ids, new, max_length=max_length,
                                                         forward=compiled),
        "transformers eager": hf(),
        "transformers compiled": hf(cache_implementation="static", compile_config=compile_config),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecompose-decode-bench"))
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    dims = QUICK if args.quick else DIMS
    prompt = args.prompt or (8 if args.quick else 32)
    new = args.new or (8 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    workdir = args.workdir / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    artifact = setup(workdir, dims)
    torch.manual_seed(0)
    runs = candidates(artifact, new, prompt + new)
    print(f"model: {dims}, BTX 4 experts top-2 (Mixtral export); prompt {prompt} tokens, "
          f"{new} new; median of {repeats} rounds after one untimed call each")
    print(f"{'batch':>5} " + " ".join(f"{name:>22}" for name in runs)
          + f" {'compiled/eager':>15} {'compiled/theirs':>16}")
    for batch in args.batch:
        ids = torch.randint(3, dims["vocab_size"], (batch, prompt))
        outputs = {name: run(ids) for name, run in runs.items()}  # compile, warm up
        ours_eager = outputs["moecompose eager"]
        for name, out in outputs.items():  # same greedy tokens (ties aside) everywhere
            agree = (out[:, prompt:] == ours_eager[:, prompt:]).float().mean().item()
            if agree < 0.9:
                print(f"  note: {name} agrees with moecompose eager on {agree:.0%} of tokens")
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(ids)
                seconds[name].append(time.perf_counter() - start)
        rate = {name: batch * new / statistics.median(s) for name, s in seconds.items()}
        print(f"{batch:>5} " + " ".join(f"{rate[name]:>16,.1f} tok/s" for name in runs)
              + f" {rate['moecompose compiled'] / rate['moecompose eager']:>14.2f}x"
              + f" {rate['moecompose compiled'] / rate['transformers compiled']:>15.2f}x")


if __name__ == "__main__":
    main()
