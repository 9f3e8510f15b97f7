"""A whole training step of an MoE model against its dense active-parameter twin.

Both are `MoECausalLM`s of the same shape except the FFNs: the MoE has E experts of width
f in every layer, top-k, load balancing and z-loss on; the twin has one dense FFN of width
k*f, so the two do the same FLOPs per token and the ratio is what routing and dispatch
cost within a real step. A step is forward, loss (computed without logits, as training
does), backward and AdamW, on random tokens; eager and `compile_model`. Steps of the two
models alternate in one process (after warm-up, compilation included), medians printed.

    python benchmarks/train_step.py                 # E=4, top-2, d=256, f=704, 4 layers
    python benchmarks/train_step.py --dim 512 --hidden 1408 --heads 8 --layers 8 \
        --vocab 32000 --batch 4 --seq 512 --repeats 5   # a larger model, 32k vocabulary
    python benchmarks/train_step.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds

from moecompose.model import ModelConfig, MoECausalLM, compile_model


def config(args: argparse.Namespace, moe: bool) -> ModelConfig:
    """The MoE model, or its dense twin (one FFN of width k*f per layer)."""
    ffn = ({"kind": "moe", "num_experts": args.experts, "intermediate_size": args.hidden,
            "router": {"kind": "topk", "k": args.top_k},
            "aux_loss": {"load_balance": 0.01, "z_loss": 0.001}}
           if moe else {"kind": "dense"})
    return ModelConfig.from_dict({
        "vocab_size": args.vocab, "hidden_size": args.dim, "num_attention_heads": args.heads,
        "num_key_value_heads": max(1, args.heads // 2), "max_position_embeddings": args.seq,
        "intermediate_size": args.top_k * args.hidden if not moe else args.hidden,
        "layers": [{"ffn": ffn}] * args.layers,
    })


def training_step(model: MoECausalLM, ids: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=704, help="expert width f")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 96, 2, 256, 2, 32
        args.repeats = 3

    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    models = {"moe": MoECausalLM(config(args, moe=True)).train(),
              "dense twin": MoECausalLM(config(args, moe=False)).train()}
    print(f"train step: E={args.experts} top-{args.top_k} d={args.dim} f={args.hidden} "
          f"vs dense f={args.top_k * args.hidden}; {args.layers} layers, vocab {args.vocab}, "
          f"{args.batch} x {args.seq} tokens, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    settings = ["eager"] if args.no_compile else ["eager", "compiled"]
    for setting in settings:
        steps = {name: training_step(compile_model(m) if setting == "compiled" else m, ids)
                 for name, m in models.items()}
        seconds = median_seconds(steps, args.repeats, warmup=3)
        tokens = args.batch * args.seq
        for name, s in seconds.items():
            print(f"  {setting:9} {name:11} {s * 1e3:9.1f} ms/step {tokens / s:10,.0f} tok/s")
        print(f"  {setting:9} moe / dense twin: {seconds['moe'] / seconds['dense twin']:.2f}x "
              "the time (target <= 1.10x)")


if __name__ == "__main__":
    main()
