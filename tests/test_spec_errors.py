"""Malformed specs and sources: each ends in one located, actionable line, exit status 2,
no traceback, and nothing written (no output folder, no partial folder, sources untouched).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecompose as mc
from moecompose import MoeComposeError
from moecompose.testing import make_dense

# ------------------------------------------------------------------------ the table

# Spec texts use <name> placeholders: the `sources` fixture's folders and the broken
# folders of `broken` below. Four-line heads keep line numbers easy to read off.
BASE = "moecompose: 1\nsources:\n  seed: <seed>\n  code: <code>\n"  # body starts at line 5
WITH_X = "moecompose: 1\nsources:\n  seed: <seed>\n  x: <{}>\n"  # 'x' path at 4:6
RULE = "layers:\n  - select: all\n    ffn:\n"  # lines 5-7; the ffn body starts at line 8


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    expect: tuple[str, ...]  # substrings of the message
    at: str | None  # "line:col" in the spec, or None when the problem has no spec location
    cli: bool = False  # also run through `moecompose validate` and `moecompose build`
    file: str = "spec.yaml"  # the spec's file name: .moe for the text syntax


CASES = [
    # --- keys and values
    Case("unknown-top-key", "moecompose: 1\nsorces:\n  seed: <seed>\n",
         ("unknown top-level key 'sorces'", "did you mean 'sources'?"), "2:1", cli=True),
    Case("unknown-nested-key", BASE + RULE + "      exprts: [seed, code]\n",
         ("unknown key 'exprts' in layers[0].ffn", "did you mean 'experts'?"), "8:7", cli=True),
    Case("bad-router-kind",
         BASE + RULE + "      experts: [seed, code]\n      router: {kind: topp, k: 2}\n",
         ("unknown router kind 'topp'", "did you mean 'topk'?"), "9:22", cli=True),
    Case("router-without-kind",
         BASE + RULE + "      experts: [seed, code]\n      router: {k: 2}\n",
         ("missing 'kind'", "'topk'"), "9:15"),
    Case("bad-format-enum", BASE + "output:\n  format: mixtrl\n",
         ("output.format: expected", "got 'mixtrl'", "did you mean 'mixtral'?"), "6:11"),
    Case("bad-dtype-enum", BASE + "output:\n  dtype: fp32\n",
         ("output.dtype: expected 'float32'", "got 'fp32'", "did you mean 'float32'?"), "6:10",
         cli=True),
    Case("bad-train-name", BASE + "train: [routers]\n",
         ("train[0]: expected", "did you mean 'router'?"), "5:9"),
    Case("bad-shard-size", BASE + "output: {max_shard_size: lots}\n",
         ("expected a size such as 2GB",), "5:26"),
    Case("shard-size-zero", BASE + "output: {max_shard_size: 0}\n",
         ("output.max_shard_size must be at least 1", "got 0"), "5:26"),
    Case("seed-not-a-number", BASE + "seed: abc\n",
         ("seed: expected a whole number", "'abc'"), "5:7"),
    Case("seed-negative", BASE + "seed: -1\n", ("seed must be at least 0", "-1"), "5:7"),
    # --- version, required keys, shape of the document
    Case("version-2", "moecompose: 2\nsources:\n  seed: <seed>\n",
         ("spec format version 2", "'moecompose: 1'"), "1:13", cli=True),
    Case("version-bool", "moecompose: true\nsources:\n  seed: <seed>\n",
         ("unknown spec format version true",), "1:13"),
    Case("missing-version", "sources:\n  seed: <seed>\n",
         ("missing required key 'moecompose'", "'moecompose: 1'"), "1:1"),
    Case("missing-sources", "moecompose: 1\nname: x\n",
         ("missing required key 'sources'",), "1:1", cli=True),
    Case("sources-empty", "moecompose: 1\nsources: {}\n",
         ("sources must have at least 1 entry",), "2:10"),
    Case("sources-a-list", "moecompose: 1\nsources: [<seed>]\n",
         ("sources: expected a mapping", "got a list"), "2:10"),
    Case("source-path-empty", "moecompose: 1\nsources:\n  seed:\n",
         ("sources.seed: expected the path of a model folder",), "3:3"),
    Case("source-bad-name", "moecompose: 1\nsources:\n  1x: <seed>\n",
         ("'1x' is not a valid name",), "3:3"),
    Case("not-a-mapping", "- moecompose: 1\n- sources: {}\n",
         ("a spec must be a mapping", "not a list"), "1:1", cli=True),
    Case("empty-file", "", ("the spec is empty",), "1:1"),
    # --- YAML itself
    Case("duplicate-key", BASE + "seed: 1\nseed: 2\n", ("duplicate key 'seed'",), "6:1", cli=True),
    Case("unclosed-bracket", "moecompose: 1\nsources: {seed: <seed>\n",
         ("YAML syntax", "'{' opened here is never closed", "add the closing '}'"), "2:10",
         cli=True),
    Case("tab-indentation", "moecompose: 1\nsources:\n\tseed: <seed>\n",
         ("YAML syntax", "tab", "indent with spaces"), "3:1"),
    Case("two-documents", BASE + "---\nname: other\n", ("one YAML document",), "5:1"),
    Case("bad-indentation", "moecompose: 1\nsources:\n  seed: <seed>\n code: <code>\n",
         ("YAML syntax", "indentation"), "4:2"),
    Case("control-character", BASE + "name: a\x07b\n",
         ("YAML syntax", "'\\x07' is not allowed"), "5:8"),
    Case("yaml-merge-key", BASE + "common: &c {k: 2}\nouter:\n  <<: *c\n",
         ("merge keys ('<<') are not supported",), "7:3"),
    Case("recursive-alias", BASE + "name: &n [*n]\n", ("alias refers to a node that contains it",),
         "5:7"),
    # --- hostile documents: bounded before they are parsed or expanded
    Case("yaml-nested-too-deep", BASE + "name: " + "[" * 20000 + "]" * 20000 + "\n",
         ("nested more than 32 levels deep",), "5:38", cli=True),
    Case("yaml-alias-bomb", BASE + "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
         ("aliases expand to more than 100,000 values",), "6:8", cli=True),
    Case("yaml-huge-integer", BASE + "seed: " + "9" * 5000 + "\n",
         ("cannot read the value '9999", "5000 digits"), "5:7", cli=True),
    Case("integer-above-bound", BASE + "seed: " + "9" * 100 + "\n",
         ("seed must be at most 9007199254740992",), "5:7"),
    Case("bool-for-integer", BASE + RULE + "      experts: [seed, code]\n"
         "      router: {kind: topk, k: true}\n",
         ("router.k: expected a whole number", "got the boolean true"), "9:31"),
    Case("init-std-infinite", BASE + RULE + "      experts: [seed, code]\n"
         "      router: {kind: topk, init_std: .inf}\n",
         ("router.init_std: expected a finite number",), "9:38"),
    Case("adapter-scale-nan", BASE + RULE + "      experts: {adapters: seed, count: 2, scale: .nan}\n",
         ("experts.scale: expected a finite number",), "8:50"),
    Case("load-balance-infinite", BASE + RULE + "      experts: [seed, code]\n"
         "      aux_loss: {load_balance: .inf}\n",
         ("aux_loss.load_balance: expected a finite number",), "9:32", cli=True),
    Case("adapter-bottleneck-resource-bomb",
         BASE + RULE + "      experts: {adapters: seed, count: 8, bottleneck: 1000000000000}\n",
         ("the plan writes", "PB", "the largest source", "refused as a likely mistake"), "1:1",
         cli=True),
    Case("nul-in-a-path", 'moecompose: 1\nsources:\n  seed: "./a\\0b"\n',
         ("text with a NUL character",), "3:9"),
    Case("markup-in-a-path", "moecompose: 1\nsources:\n  seed: ./no/[/x]/[bold]such\n",
         ("does not exist", "[/x]/[bold]such"), "3:9", cli=True),
    Case("dsl-unknown-key-in-block",
         "moecompose 1\nsources { seed = <seed>; code = <code> }\nlayers all {\n"
         "  ffn experts=[seed, code] routr=topk(k=1)\n}\n",
         ("unknown key 'routr' in layers[0].ffn", "did you mean 'router'?"), "4:28", cli=True,
         file="spec.moe"),
    Case("dsl-unknown-line-in-block",
         "moecompose 1\nsources { seed = <seed>; code = <code> }\nlayers all {\n"
         "  fnn experts=[seed, code]\n}\n",
         ("unknown key 'fnn' in layers[0]", "did you mean 'ffn'?"), "4:3", file="spec.moe"),
    Case("dsl-nested-too-deep", "moecompose 1\nname " + "[" * 5000 + "]" * 5000 + "\n",
         ("nested more than 64 deep",), "2:70", file="spec.moe"),
    # --- names that must be sources
    Case("expert-not-a-source", BASE + RULE + "      experts: [seed, cod]\n",
         ("expert 'cod' is not defined in 'sources'", "did you mean 'code'?"), "8:23", cli=True),
    Case("copy-not-a-source", BASE + RULE + "      experts: {copy: base, count: 2}\n",
         ("copy source 'base' is not defined in 'sources'", "'seed', 'code'"), "8:23"),
    Case("shared-not-a-source", BASE + RULE + "      experts: [seed, code]\n      shared: law\n",
         ("shared expert 'law' is not defined in 'sources'",), "9:15"),
    Case("merge-from-not-a-source", BASE + "merge: {from: law}\n",
         ("merge source 'law' is not defined in 'sources'",), "5:15"),
    Case("merge-weights-all-zero", BASE + "merge: {weights: {seed: 0, code: 0}}\n",
         ("merge weights sum to 0", "positive weight"), "5:18"),
    Case("merge-weight-negative", BASE + "merge: {weights: {seed: -1, code: 1}}\n",
         ("merge.weights.seed must be at least 0",), "5:25"),
    # --- experts and routers
    Case("k-above-experts",
         BASE + RULE + "      experts: [seed, code]\n      router: {kind: topk, k: 3}\n",
         ("k = 3 but the layer has only 2 experts", "k <= 2"), "9:31", cli=True),
    Case("default-k-above-experts", BASE + RULE + "      experts: [seed]\n",
         ("default router k = 2", "only 1 expert", "k: 1"), "8:16"),
    Case("k-zero",
         BASE + RULE + "      experts: [seed, code]\n      router: {kind: topk, k: 0}\n",
         ("router.k must be at least 1",), "9:31"),
    Case("experts-empty", BASE + RULE + "      experts: []\n", ("'experts' is empty",), "8:16"),
    Case("copy-without-count", BASE + RULE + "      experts: {copy: seed}\n",
         ("missing required key 'count' in layers[0].ffn.experts",), "8:16"),
    Case("count-zero", BASE + RULE + "      experts: {copy: seed, count: 0}\n",
         ("experts.count must be at least 1", "got 0"), "8:36"),
    Case("drop-above-one", BASE + RULE + "      experts: {copy: seed, count: 2, drop: 1.5}\n",
         ("experts.drop must be less than 1", "got 1.5"), "8:45"),
    Case("rule-without-ffn", BASE + "layers:\n  - select: all\n",
         ("needs an 'ffn' section",), "6:5"),
    # --- layer selections (checked against the sources' 4 layers)
    Case("layer-out-of-range", BASE + "layers:\n  - select: [0, 9]\n    ffn:\n"
         "      experts: [seed, code]\n",
         ("layer 9 does not exist", "4 layers", "0 to 3"), "6:17", cli=True),
    Case("range-to-beyond-layers", BASE + "layers:\n  - select: {from: 0, to: 8}\n    ffn:\n"
         "      experts: [seed, code]\n", ("ends at 8", "4 layers", "to: 4"), "6:27"),
    Case("range-from-beyond-layers", BASE + "layers:\n  - select: {from: 5}\n    ffn:\n"
         "      experts: [seed, code]\n", ("starts at 5", "4 layers"), "6:20"),
    Case("range-to-not-after-from", BASE + "layers:\n  - select: {from: 2, to: 2}\n    ffn:\n"
         "      experts: [seed, code]\n", ("empty layer range", "exclusive"), "6:13"),
    Case("layer-listed-twice", BASE + "layers:\n  - select: [1, 1]\n    ffn:\n"
         "      experts: [seed, code]\n", ("layer 1 is listed twice",), "6:17"),
    Case("select-unknown-word", BASE + "layers:\n  - select: some\n    ffn:\n"
         "      experts: [seed, code]\n", ("expected 'all', a list of layer indices",), "6:13"),
    # --- features this version refuses
    # --- attention experts (BAM)
    Case("attention-share-q", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, code]\n      share: [q]\n",
         ("share[0]: expected 'k' or 'v'", "got 'q'"), "9:15", cli=True),
    Case("attention-share-k-only", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, code]\n      share: [k]\n",
         ("keys and values are shared together", "share: [k, v]"), "9:14", cli=True),
    Case("attention-share-single-expert", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed]\n      share: [k, v]\n",
         ("share needs at least two attention experts",), "9:14"),
    Case("attention-soft-with-k", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, code]\n      router: {kind: soft, k: 1}\n",
         ("unknown key 'k'", "use kind: topk to choose k"), "9:28"),
    Case("attention-k-above-experts", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, code]\n      router: {kind: topk, k: 3}\n",
         ("k = 3 but the layer has only 2 attention experts",), "9:31"),
    Case("attention-nexus-router", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, code]\n      router: {kind: nexus}\n",
         ("cannot route attention experts", "kind: soft"), "9:22"),
    Case("attention-expert-not-a-source", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, cod]\n",
         ("attention expert 'cod' is not defined", "did you mean 'code'"), "8:23"),
    Case("mixtral-with-attention-experts", BASE + "layers:\n  - select: all\n    attention:\n"
         "      experts: [seed, code]\n    ffn:\n      experts: [seed, code]\n"
         "output: {format: mixtral}\n",
         ("format 'mixtral' cannot express this model", "attention experts"), "11:18"),
    Case("nexus-router-without-domains",
         BASE + RULE + "      experts: [seed, code]\n      router: {kind: nexus, k: 1}\n",
         ("the nexus router needs a domain for every routed expert", "add domains:"), "9:22"),
    Case("nexus-router-on-copies", BASE + RULE + "      experts: {copy: seed, count: 2}\n"
         "      router: {kind: nexus}\n",
         ("the nexus router needs a list of distinct expert sources",), "8:16"),
    Case("soft-router-on-ffn", BASE + RULE + "      experts: [seed, code]\n"
         "      router: {kind: soft}\n",
         ("soft routing is for attention experts",), "9:22"),
    Case("prompt-init-missing-expert", BASE + RULE + "      experts: [seed, code]\n"
         "      router: {kind: topk, init: {prompts: {seed: [hello]}}}\n",
         ("no prompts for expert 'code'",), "9:44"),
    Case("prompt-init-not-an-expert", BASE + RULE + "      experts: [seed, code]\n"
         "      router: {kind: topk, init: {prompts: {seed: [a], code: [b], law: [c]}}}\n",
         ("'law' is not an expert of this layer",), "9:67"),
    # --- adapter experts (PESC) and Mixture of Tokens
    Case("adapters-from-non-source", BASE + RULE + "      experts: {adapters: sed, count: 4}\n",
         ("adapter source 'sed' is not defined", "did you mean 'seed'"), "8:27"),
    Case("train-name-matching-nothing", BASE + RULE + "      experts: [seed, code]\n"
         "train: [router, adapters]\n",
         ("train group 'adapters' matches no tensor",), "9:17"),
    Case("token-mixing-group-of-one", BASE + RULE + "      experts: {copy: seed, count: 4}\n"
         "      router: {kind: token_mixing, group_size: 1}\n",
         ("group_size = 1", "at least 2"), "9:48"),
    Case("token-mixing-group-above-batch", BASE + RULE + "      experts: {copy: seed, count: 4}\n"
         "      router: {kind: token_mixing, group_size: 64, batch_size: 16}\n",
         ("group_size = 64 is larger than batch_size = 16",), "9:48"),
    Case("token-mixing-with-k", BASE + RULE + "      experts: {copy: seed, count: 4}\n"
         "      router: {kind: token_mixing, group_size: 8, k: 2}\n",
         ("unknown key 'k'", "'k' applies to kind: topk"), "9:51"),
    Case("token-mixing-with-adapters", BASE + RULE + "      experts: {adapters: seed, count: 4}\n"
         "      router: {kind: token_mixing, group_size: 8}\n",
         ("token mixing needs FFN experts",), "9:22"),
    Case("block-unknown", BASE + "block: paralel\n",
         ("expected 'sequential' or 'parallel'", "did you mean 'parallel'"), "5:8"),
    Case("domain-of-a-non-expert", BASE + "domains:\n  code: {embedding: ./v.npy}\n",
         ("domain 'code' is not a routed expert of any nexus layer",), "6:3"),
    Case("domain-texts-without-embed-with", BASE + RULE + "      experts: [seed, code]\n"
         "      router: {kind: nexus}\ndomains:\n  seed: {texts: a/*.txt}\n"
         "  code: {texts: b/*.txt}\n",
         ("domain texts need a model to embed them", "embed_with"), "11:17"),
    Case("domain-with-texts-and-embedding", BASE + "domains:\n  code: {texts: a/*, embedding: v.npy}\n",
         ("a domain needs exactly one of 'texts' or 'embedding'",), "6:9"),
    Case("domain-embedding-bad-shape", BASE + "layers:\n  - select: all\n    ffn:\n"
         "      experts: [seed, code]\n      router: {kind: nexus}\n"
         "domains:\n  seed: {embedding: <badvec>}\n  code: {embedding: <badvec>}\n",
         ("badvec.safetensors has an invalid shape ['a', 64] in its header",), "11:21"),
    Case("train-empty", BASE + "train: []\n", ("'train' is empty",), "5:8"),
    # --- output formats that cannot express the model
    Case("mixtral-with-shared-expert",
         BASE + RULE + "      experts: [seed, code]\n      shared: seed\noutput: {format: mixtral}\n",
         ("format 'mixtral' cannot express this model", "shared expert", "format: native"),
         "10:18", cli=True),
    Case("mixtral-on-qwen2",
         "moecompose: 1\nsources:\n  a: <qwen_seed>\n  b: <qwen_code>\n"
         + RULE + "      experts: [a, b]\noutput: {format: mixtral}\n",
         ("format 'mixtral' cannot express this model", "q/k/v biases"), "9:18"),
    Case("qwen2-moe-with-sliding-window",
         "moecompose: 1\nsources:\n  a: <mistral_window>\n"
         + RULE + "      experts: {copy: a, count: 2}\n      shared: a\n"
         "output: {format: qwen2_moe}\n",
         ("format 'qwen2_moe' cannot express this model", "sliding-window attention (window 4"),
         "9:18"),
    # --- sources
    Case("source-missing", "moecompose: 1\nsources:\n  seed: ./no/such/folder\n",
         ("source 'seed'", "does not exist", "check the path"), "3:9", cli=True),
    Case("source-is-a-file", WITH_X.format("file"), ("is not a folder",), "4:6"),
    Case("source-without-config", WITH_X.format("noconfig"), ("has no config.json",), "4:6"),
    Case("source-config-bad-json", WITH_X.format("badjson"),
         ("config.json is not valid JSON",), "4:6"),
    Case("source-config-bad-value", WITH_X.format("badvalue"),
         ("config.json field 'hidden_size' must be a whole number", "'big'"), "4:6"),
    Case("source-unknown-family", WITH_X.format("gpt2"),
         ("model_type 'gpt2'", "supported: llama"), "4:6"),
    Case("source-only-bin-weights", WITH_X.format("binonly"),
         ("has no safetensors weights", "save_pretrained"), "4:6"),
    Case("source-truncated-weights", WITH_X.format("truncated"),
         ("truncated", "model.safetensors"), "4:6", cli=True),
    Case("source-garbage-header", WITH_X.format("garbage"),
         ("corrupted safetensors header", "not JSON"), "4:6", cli=True),
    Case("source-huge-header", WITH_X.format("hugeheader"),
         ("corrupted safetensors header", "header length"), "4:6"),
    Case("source-config-contradicts-weights", "moecompose: 1\nsources:\n  x: <shapes>\n",
         ("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64]", "[128, 64]"),
         "3:6"),
    Case("source-lacks-a-tensor", WITH_X.format("lacking"),
         ("source 'x' lacks tensor 'model.layers.2.mlp.up_proj.weight'",), "4:6"),
    Case("sources-different-dtypes", WITH_X.format("bf16"),
         ("different dtypes", "'seed' is float32", "'x' is bfloat16", "output.dtype"), "2:1"),
    Case("sources-mismatched-widths", WITH_X.format("wide"),
         ("sources 'seed' and 'x' differ in hidden_size: 64 vs 96",), "4:6", cli=True),
    Case("sources-different-families", WITH_X.format("qwen_seed"),
         ("differ in model_type", "'llama' vs 'qwen2'"), "4:6", cli=True),
    Case("source-qwen2-sliding-window", "moecompose: 1\nsources:\n  x: <qwenwindow>\n",
         ("Qwen2 sliding-window attention", "max_window_layers", "use_sliding_window"), "3:6"),
    Case("source-bad-sliding-window", "moecompose: 1\nsources:\n  x: <badwindow>\n",
         ("sliding_window must be a positive integer, got 'wide'",), "3:6"),
    Case("source-config-nested-too-deep", WITH_X.format("deepconfig"),
         ("config.json is not valid JSON", "nested more than 64 levels deep"), "4:6", cli=True),
    Case("source-config-huge-integer", WITH_X.format("bigint"),
         ("config.json is not valid JSON", "a number with 5000 digits"), "4:6"),
    Case("source-config-infinite-number", WITH_X.format("infconfig"),
         ("config.json is not valid JSON", "1e999 is out of range"), "4:6"),
    Case("source-config-bool-as-string", WITH_X.format("tiestring"),
         ("field 'tie_word_embeddings' must be true or false", "the string 'false'"), "4:6",
         cli=True),
    Case("source-config-heads-not-dividing", WITH_X.format("kvheads"),
         ("not a multiple of its 3 key-value heads",), "4:6"),
    Case("source-header-nested-too-deep", WITH_X.format("deepheader"),
         ("corrupted safetensors header", "nested more than 64 levels deep"), "4:6"),
    Case("source-header-shape-not-numbers", WITH_X.format("badshape"),
         ("corrupted safetensors header", "entry 'model.norm.weight'"), "4:6"),
    Case("source-tensors-share-bytes", WITH_X.format("overlap"),
         ("corrupted safetensors header", "share bytes"), "4:6", cli=True),
    Case("source-index-outside-folder", WITH_X.format("escaping"),
         ("maps tensor", "'../", "outside the model folder"), "4:6", cli=True),
    Case("source-index-absolute-path", WITH_X.format("absolute"),
         ("maps tensor", "outside the model folder"), "4:6"),
    Case("source-weights-is-a-folder", WITH_X.format("weightsdir"),
         ("weights file 'model.safetensors' is a folder, not a file",), "4:6"),
    Case("source-weights-is-a-fifo", WITH_X.format("weightsfifo"),
         ("weights file 'model.safetensors' is a named pipe (FIFO)",), "4:6", cli=True),
    Case("source-weights-symlink-loop", WITH_X.format("weightsloop"),
         ("weights file 'model.safetensors' is a symbolic link loop",), "4:6"),
    Case("source-config-is-a-fifo", WITH_X.format("configfifo"),
         ("config.json is a named pipe (FIFO)",), "4:6"),
    Case("sources-different-windows",
         "moecompose: 1\nsources:\n  a: <mistral>\n  b: <mistral_window>\n",
         ("sources 'a' and 'b' differ in sliding_window: None vs 4",), "4:6"),
    Case("sources-different-tokenizers", WITH_X.format("tokenizer"),
         ("tokenizers of 'seed' and 'x' differ", "tokenizer.json"), "4:6", cli=True),
]
CLI_CASES = [c for c in CASES if c.cli]

assert len({c.id for c in CASES}) == len(CASES)

# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def broken(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source folders with one thing wrong each, made from copies of the seed."""
    root = tmp_path_factory.mktemp("broken")
    seed = sources["seed"]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(seed, root / name))

    def edit_config(path: Path, **changes: object) -> None:
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))

    out: dict[str, Path] = {}
    out["file"] = root / "file"
    out["file"].write_text("not a folder\n")
    out["noconfig"] = root / "noconfig"
    out["noconfig"].mkdir()
    shutil.copyfile(seed / "model.safetensors", out["noconfig"] / "model.safetensors")
    out["badjson"] = copy("badjson")
    (out["badjson"] / "config.json").write_text("{not json")
    out["badvalue"] = copy("badvalue")
    edit_config(out["badvalue"], hidden_size="big")
    out["gpt2"] = copy("gpt2")
    edit_config(out["gpt2"], model_type="gpt2")
    out["binonly"] = copy("binonly")
    (out["binonly"] / "model.safetensors").rename(out["binonly"] / "pytorch_model.bin")

    out["truncated"] = copy("truncated")
    weights = out["truncated"] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out["garbage"] = copy("garbage")
    weights = out["garbage"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    out["hugeheader"] = copy("hugeheader")
    weights = out["hugeheader"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    weights.write_bytes(bytes(data))

    out["shapes"] = copy("shapes")
    edit_config(out["shapes"], intermediate_size=128)
    out["lacking"] = copy("lacking")
    tensors = load_file(out["lacking"] / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, out["lacking"] / "model.safetensors", metadata={"format": "pt"})
    out["bf16"] = make_dense(root / "bf16", seed=0, dtype=torch.bfloat16)

    out["qwenwindow"] = Path(shutil.copytree(sources["qwen_seed"], root / "qwenwindow"))
    edit_config(out["qwenwindow"], use_sliding_window=True, sliding_window=4)
    out["badwindow"] = Path(shutil.copytree(sources["mistral"], root / "badwindow"))
    edit_config(out["badwindow"], sliding_window="wide")

    def edit_header(path: Path, edit) -> None:
        """Rewrite a safetensors header in place, keeping the data bytes."""
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        raw = edit(header)
        raw = raw if isinstance(raw, bytes) else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    out["deepconfig"] = copy("deepconfig")
    (out["deepconfig"] / "config.json").write_text(
        '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out["bigint"] = copy("bigint")
    text = (out["bigint"] / "config.json").read_text()
    (out["bigint"] / "config.json").write_text(
        re.sub(r'"vocab_size": \d+', '"vocab_size": ' + "9" * 5000, text))
    out["infconfig"] = copy("infconfig")
    text = (out["infconfig"] / "config.json").read_text()
    (out["infconfig"] / "config.json").write_text(
        re.sub(r'"rms_norm_eps": [^,}]+', '"rms_norm_eps": 1e999', text))
    out["tiestring"] = copy("tiestring")
    edit_config(out["tiestring"], tie_word_embeddings="false")
    out["kvheads"] = copy("kvheads")
    edit_config(out["kvheads"], num_key_value_heads=3)
    out["deepheader"] = copy("deepheader")
    edit_header(out["deepheader"] / "model.safetensors",
                lambda h: b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    out["badshape"] = copy("badshape")
    edit_header(out["badshape"] / "model.safetensors",
                lambda h: h["model.norm.weight"].update(shape=["a"]))
    out["overlap"] = copy("overlap")
    edit_header(out["overlap"] / "model.safetensors", lambda h: h[
        "model.layers.1.input_layernorm.weight"].update(
        data_offsets=h["model.layers.0.input_layernorm.weight"]["data_offsets"]))
    for name, prefix in (("escaping", "../seed/"), ("absolute", f"{seed}/")):
        out[name] = root / name
        out[name].mkdir()
        shutil.copyfile(seed / "config.json", out[name] / "config.json")
        names = load_file(seed / "model.safetensors")
        (out[name] / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {t: prefix + "model.safetensors" for t in names}}))
    out["weightsdir"] = copy("weightsdir")
    (out["weightsdir"] / "model.safetensors").unlink()
    (out["weightsdir"] / "model.safetensors").mkdir()
    out["weightsfifo"] = copy("weightsfifo")
    (out["weightsfifo"] / "model.safetensors").unlink()
    os.mkfifo(out["weightsfifo"] / "model.safetensors")
    out["weightsloop"] = copy("weightsloop")
    (out["weightsloop"] / "model.safetensors").unlink()
    (out["weightsloop"] / "model.safetensors").symlink_to("model.safetensors")
    out["configfifo"] = copy("configfifo")
    (out["configfifo"] / "config.json").unlink()
    os.mkfifo(out["configfifo"] / "config.json")

    out["badvec"] = root / "badvec.safetensors"
    save_file({"v": torch.ones(64)}, out["badvec"])
    edit_header(out["badvec"], lambda h: h["v"].update(shape=["a", 64]))

    out["tokenizer"] = copy("tokenizer")
    tok = json.loads((out["tokenizer"] / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = len(tok["model"]["vocab"])
    (out["tokenizer"] / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.fixture
def spec_text(sources: dict[str, Path], broken: dict[str, Path]):
    paths = {**{k: str(v) for k, v in sources.items()}, **{k: str(v) for k, v in broken.items()}}

    def fill(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(f"<{name}>", path)
        assert not re.search(r"<\w+>", text), text
        return text

    return fill


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _tree_hashes(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        if folder.is_file():
            out[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _check_message(message: str, spec: Path, case: Case) -> None:
    assert "\n" not in message, message
    assert "Traceback" not in message
    for jargon in ("Input should", "validation error", "[type=", "pydantic"):
        assert jargon not in message, message
    prefix = f"{spec}:{case.at}: " if case.at else f"{spec}: "
    assert message.startswith(prefix), f"expected location {prefix!r} in: {message}"
    for part in case.expect:
        assert part in message, f"expected {part!r} in: {message}"


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moecompose.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def _check_cli_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0][len("error: "):]


# -------------------------------------------------------------------------- tests


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len(CLI_CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_validate_gives_one_located_line(case: Case, spec_text, tmp_path: Path) -> None:
    spec = _write(tmp_path, spec_text(case.text), case.file)
    with pytest.raises(MoeComposeError) as info:
        mc.validate(spec)
    _check_message(info.value.format(), spec, case)
    assert str(info.value) == info.value.format()


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_validate_exits_2_with_one_line(case: Case, spec_text, tmp_path: Path) -> None:
    spec = _write(tmp_path, spec_text(case.text), case.file)
    message = _check_cli_error(_run_cli("validate", str(spec)))
    _check_message(message, spec, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_build_fails_cleanly(
    case: Case, spec_text, tmp_path: Path, sources: dict[str, Path], broken: dict[str, Path]
) -> None:
    spec = _write(tmp_path, spec_text(case.text), case.file)
    watched = [*sources.values(), *broken.values()]
    before = _tree_hashes(*watched)
    out_parent = tmp_path / "artifacts"
    out_parent.mkdir()
    out = out_parent / "model"

    message = _check_cli_error(_run_cli("build", str(spec), "-o", str(out)))
    _check_message(message, spec, case)

    assert not out.exists()
    assert list(out_parent.iterdir()) == [], "a failed build left files behind"
    assert _tree_hashes(*watched) == before, "a failed build modified a source"


def test_plan_reports_the_same_error_as_validate(spec_text, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "mixtral-with-shared-expert")
    spec = _write(tmp_path, spec_text(case.text), case.file)
    message = _check_cli_error(_run_cli("plan", str(spec)))
    _check_message(message, spec, case)


def test_spec_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(MoeComposeError) as info:
        mc.validate(missing)
    assert info.value.format() == f"{missing}: spec file not found"
    message = _check_cli_error(_run_cli("validate", str(missing)))
    assert message.startswith(f"{missing}: ") and "not found" in message
    out = tmp_path / "out"
    message = _check_cli_error(_run_cli("build", str(missing), "-o", str(out)))
    assert "not found" in message
    assert not out.exists()


def test_relative_spec_path_is_reported_as_given(spec_text, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "unknown-top-key")
    _write(tmp_path, spec_text(case.text))
    message = _check_cli_error(_run_cli("validate", "specs/spec.yaml", cwd=tmp_path))
    assert message.startswith("specs/spec.yaml:2:1: "), message


@pytest.mark.parametrize(
    "where",
    ["inside-a-source", "under-a-file"],
)
def test_build_refuses_bad_output_paths(
    where: str, tmp_path: Path, sources: dict[str, Path], write_spec
) -> None:
    spec = write_spec(
        """
        moecompose: 1
        sources: {seed: $seed, code: $code}
        layers:
          - select: all
            ffn:
              experts: [seed, code]
              router: {kind: topk, k: 1}
        """
    )
    before = _tree_hashes(sources["seed"], sources["code"])
    if where == "inside-a-source":
        out = sources["seed"] / "moe"
        expect = "overlaps source 'seed'"
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        out = blocker / "moe"
        expect = "cannot write"
    message = _check_cli_error(_run_cli("build", str(spec), "-o", str(out), "-q"))
    assert expect in message, message
    assert not out.exists()
    assert _tree_hashes(sources["seed"], sources["code"]) == before
    leftovers = [p for p in out.parent.iterdir() if ".partial" in p.name] if out.parent.is_dir() else []
    assert leftovers == []


def test_build_that_fails_midway_leaves_nothing(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """A source that changes between planning and building stops the build after its
    temporary folder exists: the folder is removed and the target never appears."""
    copy = Path(shutil.copytree(sources["seed"], tmp_path / "seed"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"moecompose: 1\nsources: {{seed: {copy}, code: {sources['code']}}}\n"
        "layers:\n  - select: all\n    ffn:\n      experts: [seed, code]\n"
    )
    plan = mc.plan(spec)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1024])
    before = _tree_hashes(copy, sources["code"])

    out = tmp_path / "artifacts" / "model"
    with pytest.raises(MoeComposeError) as info:
        mc.build(plan, out)
    assert "\n" not in info.value.format()
    assert not out.exists()
    assert _tree_hashes(copy, sources["code"]) == before


def test_build_failing_after_its_first_tensor_removes_its_temporary_folder(
    tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moecompose.build import executor

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"moecompose: 1\nsources: {{seed: {sources['seed']}, code: {sources['code']}}}\n"
        "layers:\n  - select: all\n    ffn:\n      experts: [seed, code]\n"
    )
    real, calls = executor.produce, []

    def failing(tensor, *args):
        calls.append(tensor.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(tensor, *args)

    monkeypatch.setattr(executor, "produce", failing)
    out = tmp_path / "artifacts" / "model"
    with pytest.raises(MoeComposeError, match="No space left on device"):
        mc.build(spec, out)
    assert len(calls) == 3 and not out.exists()
    assert not out.parent.exists()  # the build made it to hold out, and removed it


def test_api_messages_are_one_line_for_in_memory_specs() -> None:
    with pytest.raises(MoeComposeError) as info:
        mc.parse_spec("moecompose: 1\nsources: {a: x}\nsorces: {}\n")
    assert info.value.format() == (
        "<spec>:3:1: unknown top-level key 'sorces' (did you mean 'sources'?)"
    )


def test_spec_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    message = _check_cli_error(_run_cli("validate", str(fifo)))
    assert message == (f"{fifo}: the spec file is a named pipe (FIFO), not a file "
                       "(give the path of a .yaml or .moe spec file)")


@pytest.mark.slow
def test_source_with_non_finite_weights_builds_nothing_and_names_the_tensor(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """Headers cannot show a NaN, so validate passes; the build finds it while streaming."""
    copy = Path(shutil.copytree(sources["seed"], tmp_path / "seed"))
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.mlp.up_proj.weight"][4, 5] = float("inf")
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"moecompose: 1\nsources: {{seed: {copy}, code: {sources['code']}}}\n"
                    "layers:\n  - select: all\n    ffn:\n      experts: [seed, code]\n")
    mc.validate(spec)
    out = tmp_path / "out" / "model"
    message = _check_cli_error(_run_cli("build", str(spec), "-o", str(out), "-q"))
    assert ("tensor 'model.layers.1.mlp.up_proj.weight' in "
            f"{copy / 'model.safetensors'} has 2 non-finite value(s) (NaN or Inf)") in message
    assert not out.exists() and not out.parent.exists()


@pytest.mark.slow
def test_float16_output_beyond_its_range_builds_nothing_and_names_the_tensor(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """A float32 source with a value past 65504 would be stored as Inf in float16: the
    build refuses it, naming the output tensor, and prints no NumPy warning."""
    copy = Path(shutil.copytree(sources["seed"], tmp_path / "seed"))
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.weight"][0, 1] = 1e5
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"moecompose: 1\nsources: {{seed: {copy}}}\n"
                    "layers:\n  - select: all\n    ffn:\n      experts: {copy: seed, count: 2}\n"
                    "output: {dtype: float16}\n")
    out = tmp_path / "out" / "model"
    result = _run_cli("build", str(spec), "-o", str(out), "-q")
    message = _check_cli_error(result)
    assert message == ("tensor 'model.layers.2.self_attn.o_proj.weight' has values beyond "
                       "float16's range (+-65504): they would be stored as Inf (build in "
                       "bfloat16 or float32 (output: {dtype: bfloat16}))")
    assert "Warning" not in result.stderr
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_the_finite_check_finds_any_nan_or_inf(dtype: str) -> None:
    """Reading checks sources on the raw bits, in blocks: any NaN or Inf, wherever it is
    (first block, a block's edge, the tail), makes it fail; the largest finite values,
    subnormals and -0 do not."""
    import numpy as np

    from moecompose.dtypes import numpy_dtype
    from moecompose.sources import safetensors_io
    from moecompose.sources.safetensors_io import all_finite

    dt = numpy_dtype(dtype)
    assert all_finite(np.array(1.5, dtype=dt))
    big = float(torch.finfo(getattr(torch, dtype)).max)
    tiny = float(torch.finfo(getattr(torch, dtype)).smallest_normal) / 4  # subnormal
    assert all_finite(np.array([big, -big, tiny, -tiny, -0.0] * 200, dtype=dt))
    block = safetensors_io._FINITE_BLOCK
    rng = np.random.default_rng(0)
    for n in (1, 7, 33, block - 1, block, block + 3, 2 * block + 5):
        for pos in sorted({0, n // 2, n - 1, min(block, n - 1), min(block - 1, n - 1)}):
            for bad in (float("nan"), float("inf"), float("-inf")):
                x = rng.standard_normal(n).astype(dt)
                x[pos] = bad
                assert not all_finite(x), (n, pos, bad)
                assert not all_finite(x.reshape(1, n)), (n, pos, bad)
        assert all_finite(rng.standard_normal(n).astype(dt))


@pytest.mark.slow
def test_a_build_that_runs_no_model_runs_without_torch(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """Building computes with NumPy: torch (seconds to import) is loaded only to run a
    model (domain texts, router prompts)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"moecompose: 1\nsources: {{seed: {sources['seed']}, code: {sources['code']}}}\n"
                    "layers:\n  - select: all\n    ffn:\n      experts: [seed, code]\n"
                    "  - select: [1]\n    ffn:\n      experts: {copy: seed, count: 3, drop: 0.5}\n")
    out = tmp_path / "model"
    script = ("import sys; sys.modules['torch'] = None\n"  # any import of torch fails
              "from moecompose.cli import main\nmain(sys.argv[1:])\n")
    result = subprocess.run([sys.executable, "-c", script, "build", str(spec), "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file()


def test_printed_plan_keeps_user_text_and_long_paths_whole(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    """Names are never read as markup or emoji codes, and nothing a user may copy is cut
    with an ellipsis, even in a pipe 40 columns wide."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "seed"
    shutil.copytree(sources["seed"], deep)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"moecompose: 1\nname: 'x[/x] [bold]y :smile:'\nsources: {{seed: {deep}}}\n"
                    "layers:\n  - select: all\n    ffn:\n      experts: {copy: seed, count: 2}\n")
    result = subprocess.run([sys.executable, "-m", "moecompose.cli", "plan", str(spec)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    assert "x[/x] [bold]y :smile:" in result.stdout
    assert str(deep) in result.stdout.replace("\n", "") and str(deep) in result.stdout
    assert "…" not in result.stdout
