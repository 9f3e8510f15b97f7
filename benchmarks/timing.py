"""Shared timing for the layer benchmarks: interleaved medians, one table, ratios.

Every candidate is timed in the same process, repeats interleaved, so load from other
processes falls on all of them alike; results are printed as ratios, never alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

Step = Callable[[], None]
Call = Callable[[Tensor], object]  # returns y, or (y, aux loss or None)


def forward_step(call: Call, x: Tensor) -> Step:
    def step() -> None:
        with torch.no_grad():
            call(x)

    return step


def forward_backward_step(call: Call, params: Iterable[nn.Parameter], x: Tensor, grad: Tensor) -> Step:
    """One training step's forward and backward; gradients start from None as after
    `optimizer.zero_grad()`. An aux loss returned next to the output is backpropagated too."""
    params = list(params)

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        out = call(x)
        y, aux = out if isinstance(out, tuple) else (out, None)
        if aux is None:
            y.backward(grad)
        else:
            torch.autograd.backward((y, aux), (grad, torch.ones_like(aux)))

    return step


def _synchronize() -> None:
    """Wait for queued CUDA kernels, so that a step's time covers them (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(steps: dict[str, Step], repeats: int, warmup: int) -> dict[str, float]:
    """Median time of each step, repeats interleaved across steps."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize()
            start = time.perf_counter()
            step()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


Timings = dict[str, tuple[float, float]]  # name -> (fwd s, fwd+bwd s)


def time_calls(
    calls: dict[str, tuple[Call, Iterable[nn.Parameter]]],
    x: Tensor,
    grad: Tensor,
    repeats: int,
    warmup: int,
) -> Timings:
    """Forward and forward+backward medians of each named (call, parameters)."""
    fwd = median_seconds({n: forward_step(c, x) for n, (c, _) in calls.items()}, repeats, warmup)
    fwd_bwd = median_seconds(
        {n: forward_backward_step(c, p, x, grad) for n, (c, p) in calls.items()}, repeats, warmup
    )
    return {name: (fwd[name], fwd_bwd[name]) for name in calls}


def time_modules(layers: dict[str, nn.Module], x: Tensor, grad: Tensor, repeats: int, warmup: int) -> Timings:
    return time_calls({n: (m, m.parameters()) for n, m in layers.items()}, x, grad, repeats, warmup)


def print_report(rows: Timings, ratios: Iterable[tuple[str, str, str]]) -> None:
    """The timing table, then ``label: a / b`` for each ratio whose rows were timed."""
    width = max(len(name) for name in rows) + 2
    print(f"{'':{width}s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
    for name, (t_fwd, t_fwd_bwd) in rows.items():
        print(f"{name:{width}s} {t_fwd * 1e3:9.1f} {t_fwd_bwd * 1e3:11.1f}")
    ratios = [(label, a, b) for label, a, b in ratios if a in rows and b in rows]
    label_width = max((len(label) for label, _, _ in ratios), default=0) + 2
    print("ratios (lower is better):")
    for label, a, b in ratios:
        r_fwd, r_fwd_bwd = (rows[a][i] / rows[b][i] for i in range(2))
        print(f"{label:{label_width}s} fwd {r_fwd:5.2f}x   fwd+bwd {r_fwd_bwd:5.2f}x")
