"""Regenerate the bundled demo sources in specs/dense/ (tiny Llama checkpoints).

`base`/`seed` is a randomly initialised dense model; `code` and `law` are branches of it
(its weights plus seeded noise), standing in for domain experts trained from one seed.
Deterministic: running it again writes the same weights. Needs the `test` extra.

    python examples/make_demo_sources.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moecompose.testing import make_dense

ROOT = Path(__file__).resolve().parent.parent / "specs" / "dense"
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, vocab_size=128)


def write_law_embedding() -> None:
    """specs/emb/law.safetensors: the `law` domain of specs/nexus.yaml as a stored vector,
    the seed's mean final hidden state over specs/data/law/*.txt."""
    from safetensors.torch import save_file

    from moecompose.build.embed import Embedder

    texts = sorted((ROOT.parent / "data" / "law").glob("*.txt"))
    vector = Embedder.load("seed", ROOT / "seed").file_embedding(texts, max_tokens=512)
    (ROOT.parent / "emb").mkdir(exist_ok=True)
    save_file({"law": vector.contiguous()}, ROOT.parent / "emb" / "law.safetensors")


def main() -> None:
    if ROOT.exists():
        shutil.rmtree(ROOT)
    make_dense(ROOT / "base", seed=0, **DIMS)
    make_dense(ROOT / "seed", seed=0, **DIMS)
    make_dense(ROOT / "code", seed=1, base_seed=0, **DIMS)
    make_dense(ROOT / "law", seed=2, base_seed=0, **DIMS)
    for folder in ROOT.iterdir():
        (folder / "generation_config.json").unlink(missing_ok=True)
    write_law_embedding()
    print(f"wrote {', '.join(sorted(p.name for p in ROOT.iterdir()))} to {ROOT}, and the law "
          "domain embedding")


if __name__ == "__main__":
    main()
