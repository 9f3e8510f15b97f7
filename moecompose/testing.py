"""Tiny real dense checkpoints for tests, demos and benchmarks.

They are written by ``transformers`` itself (``save_pretrained``) with a small
character-level tokenizer (every ASCII character one token, within the 128-id vocabulary),
so every reader sees exactly what a Hugging Face checkpoint looks like and real text, such
as the bundled corpus in ``specs/data/train/``, tokenises with almost no ``<unk>``.
Requires the ``transformers`` and ``tokenizers`` packages (the ``test`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Sample words for test and benchmark texts; any text is valid input to the tokenizer.
WORDS = ["the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "by", "it", "at", "from", "this", "be", "are", "or", "an", "was", "def", "return", "import", "class", "if", "else", "while", "law", "court", "case", "contract", "code", "function", "value", "print", "math", "sum", "proof", "theorem", "equation", "number", "matrix", "data", "model", "expert", "token", "layer"]

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: configs use bos 1, eos 2, pad 3
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]  # printable ASCII, newline, tab


def tiny_tokenizer() -> Any:
    """A deterministic character-level fast tokenizer: 101 ids, within a vocabulary of 128.

    Ids 0..3 are ``<unk>``, ``<s>``, ``</s>``, ``<pad>``; then one id per printable ASCII
    character (32..126), ``\\n`` and ``\\t``. Every character is one token, whitespace
    included, and decoding gives ASCII text back exactly. The normalizer first folds text
    towards ASCII (NFKD, accents stripped: ``é`` -> ``e``; ``\\r\\n``, ``\\r``, ``\\f``,
    ``\\v`` -> ``\\n``); whatever is still not ASCII becomes ``<unk>``, one per character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKD(),
        normalizers.StripAccents(),
        normalizers.Replace(Regex(r"\r\n?|[\f\v]"), "\n"),
    ])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # each character
    tok.decoder = decoders.Fuse()  # concatenate tokens: no spaces inserted between them
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def dense_config(family: str = "llama", **overrides: Any) -> Any:
    import transformers

    config_cls = getattr(transformers, FAMILY_CLASSES[family][0])
    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_dense(
    path: str | Path,
    *,
    family: str = "llama",
    seed: int = 0,
    base_seed: int | None = None,
    branch_scale: float = 0.02,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    max_shard_size: str | None = None,
    **config: Any,
) -> Path:
    """Write a randomly initialised dense model to ``path`` and return the path.

    With ``base_seed``, the model is a *branch*: the weights of the ``base_seed`` model plus
    noise drawn from ``seed`` (scaled by ``branch_scale``), like domain experts trained from
    one seed model.
    """
    import transformers

    path = Path(path)
    cfg = dense_config(family, **config)
    model_cls = getattr(transformers, FAMILY_CLASSES[family][1])
    torch.manual_seed(seed if base_seed is None else base_seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases off their trivial init
        if base_seed is not None:
            gen = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * branch_scale)
    model = model.to(dtype)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path
