"""Sliding-window attention cost: a model with `sliding_window` against the same weights
without one.

While a sequence is no longer than the window, the window hides nothing: eager calls keep
attention's causal fast path and should cost what the unwindowed model costs. Past the
window every call attends through an explicit mask. Dense layers, forward (no grad) and
forward+backward, eager, medians of interleaved repeats after warm-up, one process.

    python benchmarks/window.py            # d=512, 8 heads, 2 layers, B=1, S=2048, W=4096 and 1024
    python benchmarks/window.py --quick    # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse

import torch
from timing import print_report, time_calls

from moecompose.model import MoECausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="accepted; nothing compiles")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.heads, args.layers, args.seq, args.repeats = 64, 4, 1, 64, 3
    S, warmup = args.seq, 2
    config = {
        "vocab_size": 1000,
        "hidden_size": args.dim,
        "intermediate_size": args.dim * 11 // 4,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": args.dim // args.heads,
        "max_position_embeddings": 4 * S,
        "layers": [{"ffn": {"kind": "dense"}}] * args.layers,
    }
    torch.manual_seed(0)
    full = MoECausalLM.from_config(config)
    models = {"no window": full}
    for name, window in ((f"window {2 * S} (hides nothing)", 2 * S), (f"window {S // 2}", S // 2)):
        models[name] = MoECausalLM.from_config({**config, "sliding_window": window})
        models[name].load_state_dict(full.state_dict())
    ids = torch.randint(0, 1000, (1, S))
    print(
        f"dense decoder d={args.dim}, heads={args.heads}, layers={args.layers}; B=1, S={S}, "
        f"fp32, eager, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    def call(model: MoECausalLM):
        return lambda _: (model(ids).logits, None)

    rows = time_calls(
        {name: (call(m), m.parameters()) for name, m in models.items()},
        torch.empty(0), torch.randn(1, S, config["vocab_size"]), args.repeats, warmup,
    )
    names = list(models)
    print_report(rows, [(f"{name} / no window", name, "no window") for name in names[1:]])


if __name__ == "__main__":
    main()
