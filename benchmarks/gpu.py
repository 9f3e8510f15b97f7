"""GPU timing benchmark: the three speed targets, each a ratio against a baseline timed
in the same process.

(a) MoE FFN layer (E=8, top-2, d=2048, f=1408, 8192 tokens, bf16) against its dense
    active-parameter twin (a SwiGLU of width k*f: same FLOPs per token), forward and
    forward+backward, eager and `torch.compile(fullgraph=True)`. Target: compiled
    fwd+bwd moe / dense <= 1.2x.
(b) Mixture of attention (`MixtureOfAttention`, BAM), `impl="fused"` against the
    `impl="loop"` reference with the same weights, expert-KV and shared-KV, eager, bf16.
    Target: fused / loop fwd+bwd <= 0.8x for both (the row shows the worse one).
(c) Batch-1 greedy decoding of a built Mixtral-format artifact (four dense Llamas made by
    `moecompose.testing.make_dense`, BTX, 4 experts top-2): `model.generate(ids, n,
    forward=compile_model(model))` against transformers' `generate` with
    `cache_implementation="static"` and a `CompileConfig` on the same export, bf16.
    Target: our tokens/s over theirs >= 2x.

Layers are timed as in `timing.py` (medians of interleaved repeats after warm-up), with
every step ending in `torch.cuda.synchronize()`. Each part ends with one `ratio` row;
the three rows are repeated at the end with their targets. Missing a target is reported,
not an error: the exit code is 0 unless something crashes.

    python benchmarks/gpu.py                  # CUDA; prints "skipped: no CUDA" without one
    python benchmarks/gpu.py --cpu            # tiny sizes on the CPU: a smoke run
    python benchmarks/gpu.py --cpu --no-compile   # all eager: a quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from decode import DIMS, QUICK
from decode import setup as mixtral_artifact
from moe_layer import DenseFFN, moe_spec
from timing import (
    Call,
    Timings,
    print_report,
    time_calls,
)
from torch import Tensor, nn

from moecompose.model.attention_mix import MixtureOfAttention
from moecompose.model.config import (
    MoAAttentionConfig,
    SoftRouterConfig,
)
from moecompose.model.moe import MoEFFN
from moecompose.model.parts import RotaryEmbedding


@dataclass(frozen=True)
class Sizes:
    """Shapes of the three parts, and how many timed repeats each gets."""

    # (a) MoE layer: experts, top-k, model width, expert width, tokens
    experts: int
    top_k: int
    dim: int
    hidden: int
    tokens: int
    # (b) mixture of attention: experts, width, heads, kv heads, batch, sequence length
    moa_experts: int
    moa_dim: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    # (c) decoding: the dense sources' config, prompt and new tokens
    decoder: dict[str, int]
    prompt: int
    new_tokens: int
    # timing
    repeats: int
    warmup: int
    decode_repeats: int


CUDA_SIZES = Sizes(
    experts=8, top_k=2, dim=2048, hidden=1408, tokens=8192,
    moa_experts=3, moa_dim=2048, heads=16, kv_heads=8, batch=4, seq=2048,
    decoder=DIMS,
    prompt=32, new_tokens=128,
    repeats=20, warmup=3, decode_repeats=5,
)
CPU_SIZES = Sizes(
    experts=4, top_k=2, dim=64, hidden=96, tokens=256,
    moa_experts=3, moa_dim=64, heads=4, kv_heads=2, batch=2, seq=64,
    decoder=QUICK,
    prompt=8, new_tokens=8,
    repeats=3, warmup=2, decode_repeats=1,
)


# --------------------------------------------------------------------------- timing


def wall_seconds(call: Callable[[], object], device: torch.device) -> float:
    """Wall time of `call()`, its CUDA kernels included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Target:
    """A measured ratio and the bound it should meet (`at_most`: value <= bound)."""

    label: str
    value: float
    bound: float
    at_most: bool

    @property
    def met(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        verdict = "met" if self.met else "MISSED"
        return (f"ratio {self.label:58s} {self.value:6.2f}x   target {sign} {self.bound:.1f}x   "
                f"{verdict}")


# --------------------------------------------------------------------------- (a) MoE layer


MOE_RATIOS = [
    ("moe eager / dense eager", "moe eager", "dense eager"),
    ("moe compiled / dense compiled", "moe compiled", "dense compiled"),
]


def moe_layer_timings(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, compile: bool
) -> Timings:
    """Forward and forward+backward of an `MoEFFN` (grouped dispatch, load-balance and
    z-loss on) and its dense twin `SwiGLU(d, k*f)`, eager and, with `compile`, compiled;
    rows `{moe,dense} {eager,compiled}`. x [T, d] in `dtype` on `device`."""
    torch.manual_seed(0)
    E, k, d, f, T = sizes.experts, sizes.top_k, sizes.dim, sizes.hidden, sizes.tokens
    moe = MoEFFN(d, moe_spec(E, k, f), dispatch="grouped").to(device, dtype)
    dense = DenseFFN(d, k * f).to(device, dtype)
    layers: dict[str, nn.Module] = {"dense eager": dense, "moe eager": moe}
    if compile:
        layers["dense compiled"] = torch.compile(dense, fullgraph=True)
        layers["moe compiled"] = torch.compile(moe, fullgraph=True)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=device, dtype=dtype)
    calls = {name: (layer, layer.parameters()) for name, layer in layers.items()}
    return time_calls(calls, x, grad, sizes.repeats, sizes.warmup)  # CUDA-synchronised


def moe_layer_target(rows: Timings) -> Target:
    """moe / dense fwd+bwd, compiled if timed, else eager."""
    mode = "compiled" if "moe compiled" in rows else "eager"
    value = rows[f"moe {mode}"][1] / rows[f"dense {mode}"][1]
    return Target(f"(a) moe / dense twin, fwd+bwd {mode}", value, 1.2, at_most=True)


def describe_moe_layer(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> str:
    return (f"(a) MoE FFN E={sizes.experts} top-{sizes.top_k} d={sizes.dim} f={sizes.hidden} "
            f"vs dense f={sizes.top_k * sizes.hidden}; T={sizes.tokens}, {dtype_name(dtype)}, "
            f"{device.type}")


# --------------------------------------------------------------------------- (b) attention


VARIANTS = (("expert-KV", ()), ("shared-KV", ("k", "v")))


def moa_timings(sizes: Sizes, device: torch.device, dtype: torch.dtype, compile: bool) -> Timings:
    """Forward and forward+backward of `MixtureOfAttention` with soft routing, fused and
    loop (same weights), expert-KV and shared-KV, causal, x [B, S, d]; with `compile`, the
    fused ones compiled too. Rows `{variant} {fused,loop}` and `{variant} fused compiled`."""
    torch.manual_seed(0)
    E, d, h, kv = sizes.moa_experts, sizes.moa_dim, sizes.heads, sizes.kv_heads
    B, S, dh = sizes.batch, sizes.seq, sizes.moa_dim // sizes.heads
    rope = RotaryEmbedding(dh, 10000.0).to(device)
    cos, sin = rope(torch.arange(S, device=device), dtype)  # [S, dh] each

    modules: dict[str, nn.Module] = {}
    for variant, share in VARIANTS:
        spec = MoAAttentionConfig(num_experts=E, router=SoftRouterConfig(), share=share)
        fused = MixtureOfAttention(d, h, kv, dh, spec, impl="fused").to(device, dtype)
        loop = MixtureOfAttention(d, h, kv, dh, spec, impl="loop").to(device, dtype)
        loop.load_state_dict(fused.state_dict())
        modules[f"{variant} loop"] = loop
        modules[f"{variant} fused"] = fused
        if compile:
            modules[f"{variant} fused compiled"] = torch.compile(fused, fullgraph=True)

    def attention(module: nn.Module) -> Call:
        return lambda inp: module(inp, cos, sin, None)

    x = torch.randn(B, S, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, S, d, device=device, dtype=dtype)
    calls = {name: (attention(m), m.parameters()) for name, m in modules.items()}
    return time_calls(calls, x, grad, sizes.repeats, sizes.warmup)  # CUDA-synchronised


MOA_RATIOS = [
    (f"{variant} fused{suffix} / loop", f"{variant} fused{suffix}", f"{variant} loop")
    for variant, _ in VARIANTS
    for suffix in ("", " compiled")
]


def moa_target(rows: Timings) -> Target:
    """The worse of the eager fused / loop fwd+bwd ratios of the two variants."""
    ratios = {variant: rows[f"{variant} fused"][1] / rows[f"{variant} loop"][1]
              for variant, _ in VARIANTS}
    worst = max(ratios, key=ratios.__getitem__)
    return Target(f"(b) moa fused / loop, fwd+bwd eager ({worst})", ratios[worst], 0.8,
                  at_most=True)


def describe_moa(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> str:
    return (f"(b) mixture of attention E={sizes.moa_experts} d={sizes.moa_dim} "
            f"heads={sizes.heads} kv heads={sizes.kv_heads}; B={sizes.batch} S={sizes.seq}, "
            f"soft routing, {dtype_name(dtype)}, {device.type}")


# --------------------------------------------------------------------------- (c) decoding


Generate = Callable[[Tensor], Tensor]


def quiet_transformers() -> None:
    """No progress bars from transformers, and not dynamo's note on the `lru_cache`d
    version checks its Mixtral code calls (harmless: they are constant)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")


def decoders(artifact: Path, new_tokens: int, device: torch.device,
             dtype: torch.dtype, compile: bool = True) -> dict[str, Generate]:
    """Greedy generation of `new_tokens` tokens by the same export in both libraries:
    ours eager and compiled (`compile_model`, a static cache), and transformers' compiled
    (static cache, `CompileConfig`; its default mode, "reduce-overhead", on CUDA).
    Without `compile` (a smoke run): ours eager and transformers' eager `generate`."""
    from transformers import AutoModelForCausalLM, CompileConfig

    import moecompose
    from moecompose.model.compile import compile_model

    ours = moecompose.load(artifact, dtype=dtype, device=device)
    theirs = AutoModelForCausalLM.from_pretrained(artifact, dtype=dtype).to(device).eval()
    theirs.config.output_router_logits = False  # the export asks for them (training)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    if device.type != "cuda":
        compile_config._compile_all_devices = True  # transformers compiles on CUDA-like only

    def transformers(**kwargs: Any) -> Generate:
        def run(ids: Tensor) -> Tensor:
            with torch.no_grad():
                return theirs.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        return run

    runs = {"moecompose eager": lambda ids: ours.generate(ids, new_tokens)}
    if not compile:
        return {**runs, "transformers eager": transformers()}
    compiled = compile_model(ours)
    return {
        **runs,
        "moecompose compiled": lambda ids: ours.generate(ids, new_tokens, forward=compiled),
        "transformers compiled": transformers(cache_implementation="static",
                                              compile_config=compile_config),
    }


def decode_rates(sizes: Sizes, workdir: Path, device: torch.device,
                 dtype: torch.dtype, compile: bool = True) -> dict[str, float]:
    """New tokens per second of each decoder at batch 1: median over interleaved rounds,
    after one untimed call each (compilation, warm-up)."""
    from torch._dynamo.utils import counters

    quiet_transformers()
    artifact = mixtral_artifact(workdir, sizes.decoder)  # decode.py's model
    runs = decoders(artifact, sizes.new_tokens, device, dtype, compile)
    torch.manual_seed(0)
    ids = torch.randint(4, sizes.decoder["vocab_size"], (1, sizes.prompt), device=device)
    outputs = {}
    for name, run in runs.items():
        graphs = counters["stats"]["unique_graphs"]
        outputs[name] = run(ids)
        if "compiled" in name:
            print(f"  {name}: {counters['stats']['unique_graphs'] - graphs} graph(s) compiled")
    reference = outputs["moecompose eager"][:, sizes.prompt:]
    for name, out in outputs.items():  # bf16: greedy paths may part after a near-tie
        agree = (out[:, sizes.prompt:] == reference).float().mean().item()
        print(f"  {name}: {agree:.0%} of new tokens as moecompose eager")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(sizes.decode_repeats):
        for name, run in runs.items():
            seconds[name].append(wall_seconds(lambda run=run: run(ids), device))
    return {name: sizes.new_tokens / statistics.median(s) for name, s in seconds.items()}


def decode_target(rates: dict[str, float]) -> Target:
    mode = "compiled" if "moecompose compiled" in rates else "eager"
    value = rates[f"moecompose {mode}"] / rates[f"transformers {mode}"]
    return Target(f"(c) decode tok/s, ours {mode} / transformers {mode}", value, 2.0,
                  at_most=False)


def describe_decode(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> str:
    layers, width = sizes.decoder["num_hidden_layers"], sizes.decoder["hidden_size"]
    return (f"(c) greedy decoding, batch 1: BTX 4 experts top-2 (Mixtral export) of "
            f"{layers}-layer d={width} Llamas; prompt {sizes.prompt}, {sizes.new_tokens} new "
            f"tokens, {dtype_name(dtype)}, {device.type}")


# --------------------------------------------------------------------------- main


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_all(sizes: Sizes, device: torch.device, dtype: torch.dtype, compile: bool,
            workdir: Path) -> list[Target]:
    """Time the three parts, printing each one's table and ratio row."""
    targets = []

    print(describe_moe_layer(sizes, device, dtype), flush=True)
    rows = moe_layer_timings(sizes, device, dtype, compile)
    print_report(rows, MOE_RATIOS)
    targets.append(moe_layer_target(rows))
    print(targets[-1].line(), flush=True)

    print(describe_moa(sizes, device, dtype), flush=True)
    rows = moa_timings(sizes, device, dtype, compile)
    print_report(rows, MOA_RATIOS)
    targets.append(moa_target(rows))
    print(targets[-1].line(), flush=True)

    print(describe_decode(sizes, device, dtype), flush=True)
    rates = decode_rates(sizes, workdir, device, dtype, compile)
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:10,.1f} tok/s")
    targets.append(decode_target(rates))
    print(targets[-1].line(), flush=True)
    return targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="run tiny sizes on the CPU (a smoke run; timings mean nothing)")
    parser.add_argument("--no-compile", action="store_true",
                        help="eager only; (c) then compares eager decoding (a smoke run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecompose-gpu-bench"),
                        help="where (c)'s dense sources and export are written (reused)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("skipped: no CUDA (python benchmarks/gpu.py --cpu runs tiny sizes on the CPU)")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = CPU_SIZES if args.cpu else CUDA_SIZES
    where = "CPU, tiny sizes" if args.cpu else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} CPU threads")
    workdir = args.workdir / device.type
    workdir.mkdir(parents=True, exist_ok=True)
    targets = run_all(sizes, device, torch.bfloat16, not args.no_compile, workdir)
    print("targets" + (" (CPU smoke sizes: the targets are for CUDA)" if args.cpu else "") + ":")
    for target in targets:
        print(target.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
