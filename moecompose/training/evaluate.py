"""Evaluation of built artifacts: per-domain language-model loss, perplexity, throughput,
and how each routed layer spreads a domain's tokens over its experts.

`evaluate` runs a model over each domain's evaluation blocks (int64 [N, S], from
`Corpus.eval_blocks`); `expert_usage` is the routing recorder it uses, a context manager
of forward hooks on the router modules; `render` and `results_json` show several
artifacts' results side by side.

Expert usage ("share") per routed layer, over the real tokens (padding excluded):

| router | share of expert e |
|---|---|
| token choice (`topk`, `nexus`, `adapters`: PESC's top-k) | (token, slot) assignments to e / (tokens * k) |
| `soft` | mean over tokens of e's routing weight |
| `token_mixing` | mean over tokens of e's mixing weight, each token's weights first divided by their sum over experts |

A token-mixing weight sums to 1 over a group of tokens, not over experts, so every
expert receives the same total weight (one mixed token per group); normalised per token,
the share says which experts a domain's tokens draw their output from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moecompose.errors import DataError
from moecompose.model.causal_lm import MoECausalLM
from moecompose.model.routing import (
    Routing,
    TokenMixingRouter,
    expert_counts,
)
from moecompose.report import add_row
from moecompose.training.data import DomainFiles

PARTS = ("attention", "ffn")  # the order they run in within a layer


@dataclass(frozen=True)
class LayerUsage:
    """How one routed layer spread a domain's real tokens over its experts.

    `part` is `"ffn"` or `"attention"`; `kind` the router's (`"topk"`, `"nexus"`,
    `"soft"`, `"token_mixing"`, or `"adapters"` for a PESC layer's top-k router); `share`
    one value per expert, summing to 1 (see the module docstring)."""

    layer: int
    part: str
    kind: str
    share: tuple[float, ...]

    def to_data(self) -> dict[str, Any]:
        return {"layer": self.layer, "part": self.part, "kind": self.kind, "share": list(self.share)}


@dataclass(frozen=True)
class DomainEval:
    """One domain's evaluation: `loss` the mean next-token cross-entropy (nats, no aux
    loss) over the `tokens` predicted tokens, `perplexity = exp(loss)`; `seconds` the
    wall time of its forward passes and `tokens_per_s` the input tokens (N * S) they
    processed per second; `usage` one entry per routed layer, by layer then part."""

    domain: str
    loss: float
    perplexity: float
    tokens: int
    seconds: float
    tokens_per_s: float
    usage: tuple[LayerUsage, ...] = ()

    def to_data(self) -> dict[str, Any]:
        return {
            "loss": _finite(self.loss),
            "perplexity": _finite(self.perplexity),
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": _finite(self.tokens_per_s),
            "usage": [u.to_data() for u in self.usage],
        }


@dataclass(frozen=True)
class EvalResult:
    """An artifact's evaluation on every domain, in the order they were given."""

    artifact: str
    domains: dict[str, DomainEval] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        """JSON-able: non-finite numbers (a diverged loss, its perplexity) become None."""
        return {
            "artifact": self.artifact,
            "domains": {name: d.to_data() for name, d in self.domains.items()},
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- expert usage


def _sum_dtype(device: torch.device) -> torch.dtype:
    """What sums are accumulated in on `device`: float64, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


class _RouterTally:
    """Accumulated weight per expert of one router: `sums` [E] on the router's device."""

    def __init__(self, layer: int, part: str, kind: str) -> None:
        self.layer, self.part, self.kind = layer, part, kind
        self.sums: Tensor | None = None

    def add(self, per_expert: Tensor) -> None:
        """per_expert [E]: this call's weight (or assignment count) per expert."""
        per_expert = per_expert.detach().to(_sum_dtype(per_expert.device))
        self.sums = per_expert if self.sums is None else self.sums + per_expert

    def usage(self) -> LayerUsage | None:
        """None when no real token went through the router."""
        if self.sums is None:
            return None
        sums = self.sums.double().cpu()
        total = sums.sum().item()
        if total <= 0:
            return None
        return LayerUsage(self.layer, self.part, self.kind, tuple((sums / total).tolist()))


class ExpertUsage:
    """Forward hooks that tally every router of a `MoECausalLM` while it runs: use as
    `with expert_usage(model) as usage: model(ids); usage.layers()`.

    A forward pre-hook on the model reads the call's `attention_mask` (its last S
    columns, as the decoder does), so padding is left out of the tallies; the router
    hooks read the per-token weights or top-k indices there. The hooks are removed when
    the `with` block ends, also on an exception. Calls of the routers outside a model
    forward (no mask known) count every token."""

    def __init__(self, model: MoECausalLM) -> None:
        self.model = model
        self._tokens: Tensor | None = None  # [B, S] bool, False = padding
        self._handles: list[RemovableHandle] = []
        self._tallies: list[_RouterTally] = []

    def routers(self) -> list[tuple[int, str, str, nn.Module]]:
        """(layer, part, kind, router module) of every routed part, in running order."""
        found = []
        for i, (layer, config) in enumerate(zip(self.model.model.layers, self.model.config.layers)):
            for part, module in (("attention", layer.self_attn), ("ffn", layer.mlp)):
                routed = getattr(config, part)
                if getattr(routed, "router", None) is None:
                    continue
                kind = "adapters" if routed.kind == "adapters" else routed.router.kind
                found.append((i, part, kind, module.router))
        return found

    def __enter__(self) -> ExpertUsage:
        self._tallies = []
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True)
            )
            self._handles.append(self.model.register_forward_hook(self._forget_mask))
            for layer, part, kind, router in self.routers():
                tally = _RouterTally(layer, part, kind)
                self._tallies.append(tally)
                self._handles.append(router.register_forward_hook(self._recorder(tally)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tokens = None

    def layers(self) -> tuple[LayerUsage, ...]:
        """The usage of every router that saw a real token, by layer then part."""
        usage = [u for u in (t.usage() for t in self._tallies) if u is not None]
        return tuple(sorted(usage, key=lambda u: (u.layer, PARTS.index(u.part))))

    def _read_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        self._tokens = None if mask is None else mask[:, mask.shape[-1] - ids.shape[-1] :].bool()

    def _forget_mask(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._tokens = None

    def _recorder(self, tally: _RouterTally) -> Any:
        def hook(router: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(router, TokenMixingRouter):
                tally.add(self._mixing_weights(output, args[1]))
            elif isinstance(output, Routing):  # token choice: indices [..., k]
                k = output.indices.shape[-1]
                tokens = None if self._tokens is None else self._tokens.reshape(-1)
                tally.add(expert_counts(output.indices.reshape(-1, k), output.logits.shape[-1], tokens))
            else:  # soft: weights [..., E], summing to 1 over E
                weights = output.reshape(-1, output.shape[-1])  # [T, E]
                if self._tokens is not None:
                    weights = weights * self._tokens.reshape(-1, 1)
                tally.add(weights.sum(dim=0))

        return hook

    def _mixing_weights(self, weights: Tensor, real: Tensor) -> Tensor:
        """Mixing weights [M, G, E] and real [M, G] (False: a row that pads the batch) of
        `TokenMixingFFN`'s position-major groups (M = S * n, group s * n + j holds batch
        rows j * G ... j * G + G - 1 at position s) -> each real token's weights divided
        by their sum over experts, summed over tokens [E]."""
        M, G = real.shape
        keep = real
        if self._tokens is not None:
            B, S = self._tokens.shape
            tokens = F.pad(self._tokens.t().to(torch.uint8), (0, M * G // S - B))  # [S, n * G]
            keep = real & tokens.reshape(M, G).bool()
        total = weights.sum(dim=-1, keepdim=True)  # [M, G, 1]
        share = torch.where(keep[..., None], weights / total.clamp(min=1e-30), 0.0)
        return share.sum(dim=(0, 1))


def expert_usage(model: MoECausalLM) -> ExpertUsage:
    """A context manager that records how `model`'s routers spread tokens over experts
    while it is active (`ExpertUsage`); dense layers have no entry."""
    return ExpertUsage(model)


# --------------------------------------------------------------------------- evaluate


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _wait(device: torch.device) -> None:
    """Wait for the work queued on an asynchronous device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _warm_up(model: MoECausalLM, blocks: Iterable[Tensor], batch_size: int) -> None:
    """One untimed forward of the first batch of rows, so that one-time costs (kernel
    selection, lazy initialisation) do not count in the first domain's tokens/s."""
    first = next((b for b in blocks if b.dim() == 2 and len(b) and b.shape[1] >= 2), None)
    if first is not None:
        model(first[:batch_size].to(device=_device(model), dtype=torch.long))


@torch.no_grad()
def _evaluate_domain(
    model: MoECausalLM, name: str, blocks: Tensor, batch_size: int
) -> DomainEval:
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise DataError(
            f"domain {name!r}: evaluation blocks must be [N, S] with N >= 1 and S >= 2, "
            f"got {list(blocks.shape)}"
        )
    device = _device(model)
    N, S = blocks.shape
    loss_sum = torch.zeros((), dtype=_sum_dtype(device), device=device)
    with expert_usage(model) as usage:
        _wait(device)
        start = time.perf_counter()
        for first in range(0, N, batch_size):
            ids = blocks[first : first + batch_size].to(device=device, dtype=torch.long)
            logits = model(ids).logits  # [b, S, V]
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            )
            loss_sum += loss.to(loss_sum.dtype)
        total = loss_sum.item()  # waits for the device
        seconds = time.perf_counter() - start
    tokens = N * (S - 1)
    mean = total / tokens
    return DomainEval(
        domain=name,
        loss=mean,
        perplexity=math.exp(mean) if mean < 709 else math.inf,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=N * S / seconds if seconds > 0 else math.inf,
        usage=usage.layers(),
    )


def evaluate(
    model: MoECausalLM,
    blocks: Mapping[str, Tensor],
    *,
    batch_size: int = 8,
    artifact: str = "",
) -> EvalResult:
    """Loss, perplexity, throughput and expert usage of `model` on every domain's blocks.

    blocks: domain -> int64 [N, S], full blocks (no padding); each row predicts its
    tokens 1..S-1 from the ones before, so a domain counts N * (S - 1) tokens. The rows
    run batch_size at a time, in eval mode, without gradients, on the model's device; the
    loss is the sum of the cross-entropies over all predicted tokens divided by their
    count (not a mean of batch means). One untimed forward of the first batch runs
    first. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        _warm_up(model, blocks.values(), batch_size)
        domains = {
            name: _evaluate_domain(model, name, rows, batch_size) for name, rows in blocks.items()
        }
    finally:
        model.train(was_training)
    return EvalResult(artifact, domains)


# --------------------------------------------------------------------------- output


def results_json(results: Sequence[EvalResult]) -> str:
    """The results as a JSON list, one object per artifact (`EvalResult.to_data`)."""
    return json.dumps([r.to_data() for r in results], indent=2, allow_nan=False)


def _labels(results: Sequence[EvalResult]) -> list[str]:
    """A short distinct name per result: the artifact's last path part (or `#i`)."""
    names = [r.artifact.rstrip("/").rsplit("/", 1)[-1] or f"#{i + 1}" for i, r in enumerate(results)]
    return [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]


def render(results: Sequence[EvalResult], console: Console) -> None:
    """One table of loss, perplexity and tokens/s per domain (rows) and artifact (column
    groups; the lowest loss of a domain in bold when there are several artifacts), then
    per artifact a table of expert usage: a row per routed layer and part, a column per
    expert, each cell the share per domain. Names are printed as they are, never read as
    markup."""
    labels = _labels(results)
    domains = list(dict.fromkeys(name for r in results for name in r.domains))
    summary = Table(title=Text("evaluation"), title_justify="left")
    summary.add_column(Text("domain"), overflow="fold")
    for label in labels:
        for i, column in enumerate(("loss", "ppl", "tokens/s")):
            header = Text(f"{label}\n{column}" if i == 0 else f"\n{column}")
            summary.add_column(header, justify="right", overflow="fold")
    for domain in domains:
        losses = [r.domains[domain].loss for r in results if domain in r.domains]
        best = min(losses) if len(results) > 1 and losses else None
        cells: list[Text | str] = [domain]
        for r in results:
            d = r.domains.get(domain)
            if d is None:
                cells += ["-", "-", "-"]
                continue
            cells += [
                Text(f"{d.loss:.4f}", style="bold" if d.loss == best else ""),
                f"{d.perplexity:.2f}",
                f"{d.tokens_per_s:,.0f}",
            ]
        add_row(summary, *cells)
    console.print(summary)
    for label, r in zip(labels, results):
        usage = _usage_table(r, label)
        if usage is not None:
            console.print(usage)


def _usage_table(result: EvalResult, label: str) -> Table | None:
    """The expert-usage table of one artifact (None when it has no routed layer): rows
    `layer part kind`, columns experts, cells `domain share` lines (the share alone when
    there is one domain)."""
    rows: dict[tuple[int, str, str], dict[str, tuple[float, ...]]] = {}
    for name, d in result.domains.items():
        for u in d.usage:
            rows.setdefault((u.layer, u.part, u.kind), {})[name] = u.share
    if not rows:
        return None
    experts = max(len(share) for per in rows.values() for share in per.values())
    title = Text(f"expert usage: {label}")
    out = Table(title=title, title_justify="left")
    out.add_column(Text("layer"), overflow="fold")
    for e in range(experts):
        out.add_column(Text(f"e{e}"), justify="right", overflow="fold")
    several = len(result.domains) > 1
    for (layer, part, kind), per in sorted(rows.items(), key=lambda r: (r[0][0], PARTS.index(r[0][1]))):
        cells = []
        for e in range(experts):
            lines = [
                f"{name} {share[e]:.2f}" if several else f"{share[e]:.2f}"
                for name, share in per.items()
                if e < len(share)
            ]
            cells.append("\n".join(lines) or "-")
        add_row(out, f"{layer} {part} {kind}", *cells)
    return out


# ------------------------------------------------------------------- artifacts on data


def evaluate_artifacts(
    artifacts: Sequence[Path],
    domains: Sequence[DomainFiles],
    *,
    sequence_length: int | None = None,
    max_tokens: int = 65536,
    batch_size: int = 8,
    held_out: float = 0.0,
    seed: int = 0,
    text_field: str = "text",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> list[EvalResult]:
    """Each artifact evaluated on each domain's eval data, tokenised with the artifact's
    own tokenizer: the domain's ``eval`` files, or, for a domain without them, its
    ``held_out`` documents (all of its documents when ``held_out`` is 0).
    ``sequence_length``: default the smallest of 512 and the model's positions."""
    from moecompose.loader import artifact_config, load_artifact
    from moecompose.training.data import Corpus, TextTokenizer

    results = []
    for artifact in artifacts:
        _, config = artifact_config(artifact)
        seq = sequence_length or min(512, config.max_position_embeddings)
        if seq > config.max_position_embeddings:
            raise DataError(f"sequence length {seq} is longer than the "
                            f"{config.max_position_embeddings} positions of {artifact}",
                            hint=f"use at most {config.max_position_embeddings}")
        tokenizer = TextTokenizer.from_artifact(artifact, config.eos_token_id)
        if held_out > 0:
            corpus = Corpus.load(domains, tokenizer, held_out=held_out, seed=seed,
                                 text_field=text_field)
        else:  # every document is evaluation data
            as_eval = [DomainFiles(d.name, d.eval or d.train, d.eval or d.train, d.weight)
                       for d in domains]
            corpus = Corpus.load(as_eval, tokenizer, held_out=0.0, seed=seed,
                                 text_field=text_field)
        blocks = {d.name: corpus.eval_blocks(d.name, seq, max_tokens) for d in domains}
        for name, rows in blocks.items():
            if rows.numel() and int(rows.max()) >= config.vocab_size:
                raise DataError(f"domain '{name}': the tokenizer of {artifact} gives token id "
                                f"{int(rows.max())}, beyond the model's vocabulary of "
                                f"{config.vocab_size}",
                                hint="the artifact's tokenizer does not match its model")
        empty = [name for name, rows in blocks.items() if rows.shape[0] < 1 or rows.shape[1] < 2]
        if empty:
            raise DataError(f"no evaluation text for domain(s) {', '.join(empty)}",
                            hint="give files with text, or a larger held-out fraction")
        model = load_artifact(artifact, dtype=dtype, device=device)
        results.append(evaluate(model, blocks, batch_size=batch_size, artifact=str(artifact)))
    return results
