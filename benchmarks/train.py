"""Training benchmark: `moecompose train` against transformers' `Trainer` on the same model
and the same batches.

Model: a dense Llama (written once by transformers into --workdir) sparse-upcycled into
4 experts in every layer, top-2, load balancing 0.01 and no z-loss (transformers has
none), exported as Mixtral. Data: the bundled corpus (specs/data/train), tokenised with
the artifact's tokenizer and drawn by moecompose's `BatchStream`; the transformers run
gets exactly those batches (a `Dataset` of them, in order, no shuffling).

* moecompose: `moecompose.train` with a recipe of the same steps, batch, AdamW settings and
  a constant lr; seconds per step from its metrics log (tokens / tokens_per_s).
* transformers: `Trainer` on `AutoModelForCausalLM.from_pretrained(export)` with
  `output_router_logits=True` and `router_aux_loss_coef=0.01`, experts run with
  `grouped_mm` (the fastest CPU setting we found: about 1.15x `eager`), the same AdamW; seconds
  per step from a callback (step begin to step end).
* eager and compiled (recipe `compile: true`; `TrainingArguments(torch_compile=True)`).

Each run is its own child process (so its peak RSS, `VmHWM`, is its own); the first
steps (compilation, allocator warmup) are dropped and the median of the rest is kept.
The two runs of a setting alternate `--repeats` times (ours, theirs, ours, theirs, ...),
so that a slow spell of a shared machine hits both; each pair gives one ratio.
Printed: tokens/s of each (median over repeats), the median ratio moecompose ÷
transformers with the lowest and highest pair's, and peak RSS ratios.

    python benchmarks/train.py [--workdir DIR] [--quick] [--steps N] [--repeats R]

Needs the test extra and `accelerate` (transformers' Trainer requires it): `pip install
'moecompose[hf]'`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "specs" / "data" / "train"
DIMS = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=8000,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
QUICK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
SPEC = """\
moecompose: 1
sources: {base: ./dense}
layers:
- select: all
  ffn:
    experts: {copy: base, count: 4}
    router: {kind: topk, k: 2}
    aux_loss: {load_balance: 0.01, z_loss: 0.0}
output: {format: mixtral}
"""


def setup(workdir: Path, dims: dict[str, int]) -> Path:
    """The dense source and its Mixtral export (reused when already there)."""
    import moecompose
    from moecompose.testing import make_dense

    if not (workdir / "dense" / "config.json").is_file():
        make_dense(workdir / "dense", seed=0, **dims)
    artifact = workdir / "moe"
    if not (artifact / "config.json").is_file():
        (workdir / "spec.yaml").write_text(SPEC)
        moecompose.build(workdir / "spec.yaml", artifact)
    return artifact


def recipe_text(artifact: Path, steps: int, seq: int, batch: int, compile: bool) -> str:
    return f"""\
moecompose_recipe: 1
artifact: {artifact}
data:
  code: {{files: ['{CORPUS}/code/*.txt']}}
  legal: {{files: ['{CORPUS}/legal/*.txt']}}
held_out: 0.0
sequence_length: {seq}
batch_tokens: {seq * batch}
steps: {steps}
optimizer: {{lr: 1e-4, weight_decay: 0.0}}
schedule: {{kind: constant}}
grad_clip: 1.0
compile: {str(compile).lower()}
"""


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(workdir: Path, artifact: Path, steps: int, seq: int, batch: int,
             compile: bool) -> dict[str, object]:
    import moecompose
    from moecompose.training.recipe import parse_recipe

    name = f"ours-{'compiled' if compile else 'eager'}"
    recipe = parse_recipe(recipe_text(artifact, steps, seq, batch, compile), file=f"{name}.yaml")
    result = moecompose.train(recipe, workdir / name, force=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [seq * batch / e["tokens_per_s"] for e in events if e["event"] == "train"]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    return {"seconds": seconds, "losses": losses, "rss": peak_rss()}


def batches(artifact: Path, steps: int, seq: int, batch: int) -> list[list[list[int]]]:
    """The batches the moecompose run trains on, in order."""
    from moecompose.loader import artifact_config
    from moecompose.training.data import BatchStream, Corpus, DomainFiles, TextTokenizer

    _, config = artifact_config(artifact)
    tokenizer = TextTokenizer.from_artifact(artifact, config.eos_token_id)
    domains = [DomainFiles(d, tuple(sorted((CORPUS / d).glob("*.txt")))) for d in ("code", "legal")]
    corpus = Corpus.load(domains, tokenizer, held_out=0.0, seed=0)
    stream = BatchStream(corpus, {"code": 1.0, "legal": 1.0}, seq_len=seq, sequences=batch, seed=0)
    return [stream.next_batch()[0].tolist() for _ in range(steps)]


def run_transformers(workdir: Path, artifact: Path, steps: int, seq: int, batch: int,
                     compile: bool) -> dict[str, object]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    rows = [row for b in batches(artifact, steps, seq, batch) for row in b]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.tensor(rows[i])
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []

        def on_step_begin(self, *args: object, **kwargs: object) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    model = AutoModelForCausalLM.from_pretrained(
        artifact, dtype=torch.float32, experts_implementation="grouped_mm")
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.01
    args = TrainingArguments(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=1e-4, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        torch_compile=compile, seed=0, disable_tqdm=True,
    )
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[clock])
    trainer.train()
    return {"seconds": clock.seconds, "rss": peak_rss()}


def child(kind: str, workdir: Path, steps: int, seq: int, batch: int, compile: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(workdir),
           "--steps", str(steps), "--seq", str(seq), "--batch", str(batch)]
    if compile:
        cmd.append("--compile")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moecompose-train-bench"))
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled runs")
    parser.add_argument("--repeats", type=int, default=None,
                        help="pairs of runs per setting (default 3, 1 with --quick)")
    parser.add_argument("--child", choices=("ours", "transformers"))
    args = parser.parse_args()
    dims = QUICK if args.quick else DIMS
    steps = args.steps or (4 if args.quick else 12)
    seq = args.seq or (32 if args.quick else 256)
    batch = args.batch or (2 if args.quick else 8)
    workdir = args.workdir / ("quick" if args.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    artifact = setup(workdir, dims)
    if args.child == "ours":
        print(json.dumps(run_ours(workdir, artifact, steps, seq, batch, args.compile)))
        return
    if args.child == "transformers":
        print(json.dumps(run_transformers(workdir, artifact, steps, seq, batch, args.compile)))
        return
    drop = 1 if args.quick else 3
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"model: {dims}, 4 experts top-2 (Mixtral export); {steps} steps of {batch} x {seq} "
          f"tokens; median of steps after the first {drop}; {repeats} pairs of runs")
    print(f"{'setting':<10} {'moecompose tok/s':>17} {'transformers tok/s':>19} {'ratio':>7} "
          f"{'(low-high)':>12} {'RSS ours / theirs':>18}")
    for compiled in (False,) if args.eager_only else (False, True):
        ours, theirs, rss = [], [], []
        for _ in range(repeats):
            a = child("ours", workdir, steps, seq, batch, compiled)
            b = child("transformers", workdir, steps, seq, batch, compiled)
            ours.append(seq * batch / statistics.median(a["seconds"][drop:]))
            theirs.append(seq * batch / statistics.median(b["seconds"][drop:]))
            rss.append(a["rss"] / b["rss"])
        ratios = sorted(x / y for x, y in zip(ours, theirs, strict=True))
        name = "compiled" if compiled else "eager"
        spread = f"({ratios[0]:.2f}-{ratios[-1]:.2f})"
        print(f"{name:<10} {statistics.median(ours):>17,.0f} {statistics.median(theirs):>19,.0f} "
              f"{statistics.median(ratios):>6.2f}x {spread:>12} {max(rss):>17.2f}x")


if __name__ == "__main__":
    main()
