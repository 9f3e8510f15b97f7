"""GPU acceptance check: every bundled spec built, loaded in bf16 on the GPU, run eager
and compiled, and the two compared. Runs on the CPU too, skipping the CUDA-only checks
(each with a "skipped: no CUDA" line).

    python benchmarks/gpu_check.py [--out DIR] [--only demo,bam] [--full]

Per artifact (`specs/NAME.yaml`, built by `python -m moecompose.cli build` from the repo):
  * loaded with `moecompose.load(dtype="bfloat16", device=...)`: bf16 parameters, every
    parameter and buffer on the device;
  * eager: forward causal and with a left-padded row (finite logits); forward+backward
    with `labels` (finite loss and gradients); the loss-only forward
    (`return_logits=False`) gives the same loss and gradients;
  * CUDA only: SDPA with only the flash kernel (causal) and with only fused kernels
    (padded); host-device synchronisations of one eager forward;
  * compiled with `compile_model` (demo on the CPU, demo and bam on CUDA, every artifact
    with --full): logits against eager over four shapes; at most 2 graphs (with and
    without a mask); no recompile for a sliced batch; forward+backward gradients as close
    to the fp32 model's as eager bf16's are; static-cache decoding (a prompt, then 8
    teacher-forced steps) against eager, in one graph, and its host syncs per step on CUDA.
Then, on CUDA, demo compiled with `mode="reduce-overhead"`, forward and decoding (against
eager; cudagraph skips are a WARN), and on any device the MoE layer timed against its
dense active-parameter twin (part (a) of benchmarks/gpu.py: E=8, top-2, d=2048, f=1408,
8192 tokens, bf16 on CUDA; tiny sizes on the CPU).

Each check prints a PASS, FAIL or WARN line (WARN: correct, but not as fast as it should
be: a recompile, a host sync, a cudagraph skip, a missed speed target) and the run ends
with a summary line; the exit code is 1 if any check FAILed. Thresholds suit bf16:
relative error (Frobenius norm) 3% on logits, 5% on all gradients together (or, compiled,
no more than 1.25 times eager bf16's own error to fp32). Expect ~3-6 min on an H100/H200
(torch.compile dominates); `--only demo` for a quick pass.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from gpu import (
    CPU_SIZES,
    CUDA_SIZES,
    MOE_RATIOS,
    describe_moe_layer,
    moe_layer_target,
    moe_layer_timings,
)
from timing import print_report
from torch import Tensor
from torch._dynamo.utils import counters

import moecompose
from moecompose.model import MoECausalLM
from moecompose.model.compile import compile_model

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LOGITS_TOLERANCE = 0.03  # relative error of bf16 logits, compiled against eager
GRADS_TOLERANCE = 0.05  # relative error of all bf16 gradients together
GRADS_SLACK = 1.25  # or: compiled bf16 gradients at most this much further from fp32's than eager's
LOSS_TOLERANCE = 0.01  # relative difference of two fp32 losses from bf16 activations
DECODE_STEPS = 8

T = TypeVar("T")


# --------------------------------------------------------------------------- reporting


class Report:
    """One PASS / FAIL / WARN (or SKIP) line per check; remembers the failed checks."""

    def __init__(self) -> None:
        self.counts = {"PASS": 0, "FAIL": 0, "WARN": 0, "SKIP": 0}
        self.failed: list[str] = []

    def record(self, name: str, ok: bool | None, detail: str = "") -> None:
        """PASS when `ok`, FAIL when not, WARN when None."""
        status = {True: "PASS", False: "FAIL", None: "WARN"}[ok]
        self._line(status, name, detail)
        if ok is False:
            self.failed.append(name)

    def skip(self, name: str, why: str = "no CUDA") -> None:
        self._line("SKIP", name, f"skipped: {why}")

    def attempt(self, name: str, check: Callable[..., T], *args: Any) -> T | None:
        """`check(*args)`, or None after a FAIL line for `name` when it raises."""
        try:
            return check(*args)
        except Exception as exc:
            self.record(name, False, describe(exc))
            return None

    def summary(self, seconds: float) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items())
        failed = f": {', '.join(self.failed)}" if self.failed else ""
        return f"gpu_check done in {seconds:.0f}s on {DEVICE.type}: {counts}{failed}"

    def _line(self, status: str, name: str, detail: str) -> None:
        self.counts[status] += 1
        print(f"[{status}] {name}" + (f": {detail}" if detail else ""), flush=True)


def describe(exc: BaseException) -> str:
    """The exception's type, first line and the last three frames it came through."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = ", ".join(f"{Path(frame.filename).name}:{frame.lineno}" for frame in frames)
    message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message} (at {where})"


# --------------------------------------------------------------------------- helpers


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """`|actual - expected| / |expected|` in fp32, Frobenius norms."""
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm().clamp_min(1e-6)).item()


def gradients_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> tuple[float, str]:
    """Relative error of all gradients together, and the tensor whose own error is worst
    (with it), over the names both have."""
    names = [name for name in expected if name in actual]
    total = relative_error(torch.cat([actual[n].float().flatten() for n in names]),
                           torch.cat([expected[n].float().flatten() for n in names]))
    worst_error, worst = max((relative_error(actual[n], expected[n]), n) for n in names)
    return total, f"worst tensor {worst} {worst_error:.1e}"


def graph_count() -> int:
    """Graphs dynamo compiled since `counters.clear()`."""
    return counters["stats"]["unique_graphs"]


def fresh_compile(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """`compile_model(model, **kwargs)` after clearing dynamo's caches and counters, so
    graph counts are this compilation's."""
    torch._dynamo.reset()
    counters.clear()
    return compile_model(model, **kwargs)


def plain(t: Tensor) -> Tensor:
    """A contiguous copy: the strides of a fresh tensor, not of a slice."""
    return t.clone(memory_format=torch.contiguous_format)


def host_syncs(call: Callable[[], object]) -> int:
    """Host-device synchronisations during `call()` (CUDA's sync debug mode warns on each)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sync_result(syncs: int) -> bool | None:
    """PASS for none, WARN for any."""
    return True if syncs == 0 else None


@dataclass
class Batch:
    """Two sequences of 24 tokens; the second left-padded by 5 (`mask` 0 there)."""

    ids: Tensor  # [2, 24]
    mask: Tensor  # [2, 24], 1 = token, 0 = padding


def sample_batch(vocab_size: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab_size, (2, 24), generator=generator).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return Batch(ids, mask)


@dataclass
class Eager:
    """The eager model's results the compiled ones are compared with."""

    logits: Tensor  # [2, 24, V], causal
    padded_logits: Tensor  # [2, 24, V], with the batch's mask
    loss: float
    grads: dict[str, Tensor]


def training_step(
    forward: Callable[..., Any], model: MoECausalLM, batch: Batch, return_logits: bool = True
) -> tuple[float, dict[str, Tensor]]:
    """One forward+backward of `forward` (the model, or it compiled) in training mode on
    the padded batch, labels = ids: (the loss, a copy of every gradient). The model's
    gradients are cleared before and after."""
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        out = forward(batch.ids, attention_mask=batch.mask, labels=batch.ids,
                      return_logits=return_logits)
        out.loss.backward()
    finally:
        model.eval()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


# --------------------------------------------------------------------------- builds


def spec_names(only: str) -> list[str]:
    """The bundled specs (`specs/*.yaml`) by name, limited to the comma-separated `only`."""
    names = sorted(path.stem for path in (ROOT / "specs").glob("*.yaml"))
    if not only:
        return names
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"gpu_check: no specs/NAME.yaml for {unknown}; bundled: {names}")
    return [name for name in names if name in wanted]


def build_artifacts(report: Report, names: list[str], out: Path) -> list[str]:
    """Build `specs/NAME.yaml` into `out/NAME` with the CLI, from the repo root, for each
    name; returns the names that built."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    built = []
    for name in names:
        command = [sys.executable, "-m", "moecompose.cli", "build", f"specs/{name}.yaml",
                   "-o", str(out / name), "--force"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        ok = result.returncode == 0
        lines = (result.stdout if ok else result.stderr or result.stdout).strip().splitlines()
        report.record(f"build {name}", ok, lines[-1][:150] if lines else "")
        if ok:
            built.append(name)
    return built


# --------------------------------------------------------------------------- eager checks


def check_load(report: Report, name: str, path: Path) -> MoECausalLM:
    """Load in bf16 on the device: parameters bf16, every tensor there."""
    model = moecompose.load(path, dtype="bfloat16", device=DEVICE)
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    report.record(f"{name} load bf16", dtypes == ["torch.bfloat16"],
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, {dtypes}")
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    off = [n for n, t in tensors if t.device.type != DEVICE.type]
    detail = f"{len(off)} tensor(s) off {DEVICE.type}: {off[:3]}" if off else (
        f"all {len(tensors)} tensors on {DEVICE.type}")
    report.record(f"{name} placement", not off, detail)
    return model


def check_eager(report: Report, name: str, model: MoECausalLM, batch: Batch) -> Eager:
    """Eager forward (causal, padded) and forward+backward: everything finite."""
    with torch.no_grad():
        logits = model(batch.ids).logits
        padded = model(batch.ids, attention_mask=batch.mask).logits
    finite = bool(torch.isfinite(logits).all() and torch.isfinite(padded).all())
    report.record(f"{name} eager forward", finite, f"logits {tuple(logits.shape)} {logits.dtype}")
    loss, grads = training_step(model, model, batch)
    finite = bool(torch.isfinite(torch.tensor(loss))) and all(
        bool(torch.isfinite(g).all()) for g in grads.values())
    report.record(f"{name} eager fwd+bwd", finite and bool(grads),
                  f"loss {loss:.3f}, {len(grads)} gradients")
    return Eager(logits, padded, loss, grads)


def check_loss_only(report: Report, name: str, model: MoECausalLM, batch: Batch,
                    eager: Eager) -> None:
    """`return_logits=False` (chunked cross-entropy, no logits) against the logits path."""
    loss, grads = training_step(model, model, batch, return_logits=False)
    loss_diff = abs(loss - eager.loss) / max(abs(eager.loss), 1e-6)
    error, worst = gradients_error(grads, eager.grads)
    same_names = set(grads) == set(eager.grads)
    report.record(f"{name} loss-only forward vs logits", same_names and loss_diff < LOSS_TOLERANCE
                  and error < GRADS_TOLERANCE,
                  f"loss {loss:.4f} vs {eager.loss:.4f}, all-gradient rel err {error:.2e} ({worst})")


def check_cuda_kernels(report: Report, name: str, model: MoECausalLM, batch: Batch) -> None:
    """The causal path runs on flash attention alone; the padded path on fused kernels
    alone (no math fallback); host syncs of one eager forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(backends: list[SDPBackend], mask: Tensor | None) -> bool:
        with torch.no_grad(), sdpa_kernel(backends):
            model(batch.ids, attention_mask=mask)
        return True

    flash = [SDPBackend.FLASH_ATTENTION]
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.CUDNN_ATTENTION]
    if report.attempt(f"{name} sdpa flash (causal)", run, flash, None):
        report.record(f"{name} sdpa flash (causal)", True)
    if report.attempt(f"{name} sdpa fused (padded)", run, fused, batch.mask):
        report.record(f"{name} sdpa fused (padded)", True)
    with torch.no_grad():
        syncs = host_syncs(lambda: model(batch.ids))
    report.record(f"{name} host syncs / eager forward", sync_result(syncs), str(syncs))


# --------------------------------------------------------------------------- compiled checks


def check_compiled_forward(report: Report, name: str, model: MoECausalLM, batch: Batch,
                           eager: Eager) -> None:
    """Compiled logits against eager; one graph per mask/no-mask over four shapes; no
    recompile when a slice of a batch comes in."""
    fast = fresh_compile(model)
    with torch.no_grad():
        logits = fast(batch.ids).logits
        padded = fast(batch.ids, attention_mask=batch.mask).logits
        fast(plain(batch.ids[:1, :7]))
        fast(plain(batch.ids[:, :1]))
    error = max(relative_error(logits, eager.logits), relative_error(padded, eager.padded_logits))
    agree = (logits.argmax(-1) == eager.logits.argmax(-1)).float().mean().item()
    report.record(f"{name} compiled vs eager logits", error < LOGITS_TOLERANCE,
                  f"rel err {error:.2e}, argmax agree {agree:.3f}")
    graphs = graph_count()
    report.record(f"{name} compiled graphs (4 shapes, mask and none)", graphs <= 2,
                  f"{graphs} graph(s)")
    with torch.no_grad():
        fast(batch.ids[1:2, :9])  # a view: stride(0) is 24, not 9
    extra = graph_count() - graphs
    report.record(f"{name} no recompile for a [1, S] slice of a batch", extra == 0 or None,
                  f"{extra} extra graph(s)")


def check_compiled_training(report: Report, name: str, model: MoECausalLM, batch: Batch,
                            eager: Eager, path: Path) -> None:
    """Compiled forward+backward: gradients for the same parameters as eager, and as
    accurate. Eager bf16 gradients are themselves a few percent off (tiny random models,
    gradients summed over many bf16 roundings), so both are measured against the fp32
    model's: the compiled ones pass within `GRADS_TOLERANCE` of those, or when no further
    from them than eager bf16's (times `GRADS_SLACK`)."""
    fast = fresh_compile(model)
    loss, grads = training_step(fast, model, batch)
    graphs = graph_count()
    reference = moecompose.load(path, dtype="float32", device=DEVICE)
    _, exact = training_step(reference, reference, batch)
    missing = sorted(set(eager.grads) - set(grads))
    compiled_error, worst = gradients_error(grads, exact)
    eager_error, _ = gradients_error(eager.grads, exact)
    between, _ = gradients_error(grads, eager.grads)
    accurate = compiled_error < max(GRADS_TOLERANCE, GRADS_SLACK * eager_error)
    report.record(f"{name} compiled fwd+bwd grads", not missing and accurate,
                  f"rel err to fp32 {compiled_error:.2e} (eager bf16 {eager_error:.2e}; "
                  f"{worst}), to eager bf16 {between:.2e}, loss {loss:.4f} vs eager "
                  f"{eager.loss:.4f}, {graphs} graph(s)"
                  + (f", missing {missing[:3]}" if missing else ""))


def check_compiled_decode(report: Report, name: str, model: MoECausalLM, batch: Batch,
                          mode: str | None = None) -> None:
    """Static-cache decoding compiled (with `mode`, if given) against eager: a 16-token
    prompt, then `DECODE_STEPS` steps, both fed eager's greedy token (teacher forcing);
    the logits of every call compared; graphs; host syncs per step on CUDA."""
    label = f"{name} compiled" + (f" {mode}" if mode else "") + " static-cache decode"
    fast = fresh_compile(model) if mode is None else fresh_compile(model, mode=mode)
    batch_size = batch.ids.shape[0]
    eager_cache = model.new_cache(max_length=48, batch_size=batch_size)
    compiled_cache = model.new_cache(max_length=48, batch_size=batch_size)
    tokens = plain(batch.ids[:, :16])
    errors = []
    with torch.no_grad():
        for _ in range(DECODE_STEPS + 1):
            expected = model(tokens, cache=eager_cache).logits
            actual = fast(tokens, cache=compiled_cache).logits
            errors.append(relative_error(actual, expected))
            tokens = expected[:, -1:].argmax(-1)  # [B, 1]
    report.record(f"{label} vs eager", max(errors) < LOGITS_TOLERANCE,
                  f"worst call rel err {max(errors):.2e} (prompt + {DECODE_STEPS} steps)")
    graphs = graph_count()
    report.record(f"{label} graphs", graphs == 1 or None,
                  f"{graphs} graph(s) for the prompt and {DECODE_STEPS} steps")
    if not CUDA:
        return
    with torch.no_grad():
        syncs = host_syncs(lambda: fast(tokens, cache=compiled_cache))
    report.record(f"{label} host syncs / step", sync_result(syncs), str(syncs))
    if mode == "reduce-overhead":
        skips = counters["inductor"]["cudagraph_skips"]
        report.record(f"{label} cudagraphs", skips == 0 or None, f"{skips} cudagraph skip(s)")


def check_reduce_overhead_forward(report: Report, model: MoECausalLM, batch: Batch,
                                  expected: Tensor) -> None:
    """`mode="reduce-overhead"` forward, four calls: logits against eager, cudagraph skips."""
    fast = fresh_compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(4):
            logits = fast(batch.ids).logits.clone()  # cudagraph outputs are overwritten
    torch.cuda.synchronize()
    error = relative_error(logits, expected)
    report.record("demo reduce-overhead forward vs eager", error < LOGITS_TOLERANCE,
                  f"rel err {error:.2e}")
    skips = counters["inductor"]["cudagraph_skips"]
    report.record("demo reduce-overhead forward cudagraphs", skips == 0 or None,
                  f"{skips} cudagraph skip(s)")


# --------------------------------------------------------------------------- per artifact


def check_artifact(report: Report, name: str, path: Path, compiled: bool) -> None:
    """Every check of one built artifact; the compiled ones only when `compiled`."""
    model = report.attempt(f"{name} load bf16", check_load, report, name, path)
    if model is None:
        return
    batch = sample_batch(model.config.vocab_size)
    eager = report.attempt(f"{name} eager", check_eager, report, name, model, batch)
    if eager is None:
        return
    report.attempt(f"{name} loss-only forward vs logits", check_loss_only, report, name, model,
                   batch, eager)
    if CUDA:
        report.attempt(f"{name} cuda kernels", check_cuda_kernels, report, name, model, batch)
    else:
        report.skip(f"{name} sdpa kernels and host syncs")
    if not compiled:
        return
    report.attempt(f"{name} compiled vs eager logits", check_compiled_forward, report, name,
                   model, batch, eager)
    report.attempt(f"{name} compiled fwd+bwd grads", check_compiled_training, report, name,
                   model, batch, eager, path)
    report.attempt(f"{name} compiled static-cache decode", check_compiled_decode, report, name,
                   model, batch)


def check_reduce_overhead(report: Report, path: Path) -> None:
    """Demo compiled with CUDA graphs (`mode="reduce-overhead"`): forward and decoding."""
    model = moecompose.load(path, dtype="bfloat16", device=DEVICE)
    batch = sample_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(batch.ids).logits
    report.attempt("demo reduce-overhead forward", check_reduce_overhead_forward, report, model,
                   batch, expected)
    report.attempt("demo reduce-overhead decode", check_compiled_decode, report, "demo", model,
                   batch, "reduce-overhead")


def check_moe_layer_speed(report: Report) -> None:
    """The MoE layer against its dense twin, eager and compiled (benchmarks/gpu.py (a))."""
    sizes = CUDA_SIZES if CUDA else CPU_SIZES
    print(describe_moe_layer(sizes, DEVICE, torch.bfloat16), flush=True)
    rows = moe_layer_timings(sizes, DEVICE, torch.bfloat16, compile=True)
    print_report(rows, MOE_RATIOS)
    target = moe_layer_target(rows)
    if CUDA:
        report.record("moe layer vs dense twin speed", target.met or None, target.line())
    else:
        report.record("moe layer vs dense twin timing", True,
                      f"{target.value:.2f}x at CPU sizes (the 1.2x target is for CUDA)")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu_check",
                        help="where the artifacts are built (one folder per spec)")
    parser.add_argument("--only", default="",
                        help="comma-separated spec names, e.g. demo,bam (default: all)")
    parser.add_argument("--full", action="store_true",
                        help="compiled checks on every artifact (default: demo; demo, bam on CUDA)")
    parser.add_argument("--no-compile", action="store_true",
                        help="eager checks only (a quick CPU smoke run: compiling takes minutes)")
    parser.add_argument("--no-timing", action="store_true",
                        help="skip timing the MoE layer against its dense twin")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    names = spec_names(args.only)
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    print(f"torch {torch.__version__}, device {device}, moecompose at {ROOT}, out {args.out}",
          flush=True)
    report = Report()
    built = build_artifacts(report, names, args.out)
    compiled = set(built) if args.full else ({"demo", "bam"} if CUDA else {"demo"})
    if args.no_compile:
        compiled = set()
    for name in built:
        check_artifact(report, name, args.out / name, name in compiled)
    if not CUDA:
        report.skip("demo reduce-overhead forward and decode")
    elif "demo" in built:
        report.attempt("demo reduce-overhead", check_reduce_overhead, report, args.out / "demo")
    if args.no_timing:
        report.skip("moe layer vs dense twin timing", "--no-timing")
    else:
        report.attempt("moe layer vs dense twin timing", check_moe_layer_speed, report)
    print(report.summary(time.perf_counter() - started), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
