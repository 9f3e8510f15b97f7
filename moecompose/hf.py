"""The Hugging Face face of a native artifact: a config and a causal-LM class that
transformers' Auto classes, ``Trainer``, PEFT and ``generate`` use, with moecompose's own
model code behind them.

``MoeComposeForCausalLM`` *is* the native model under transformers' base classes: it holds
the same ``model`` and ``lm_head`` submodules as ``MoECausalLM`` (so the same state-dict
keys, and a folder it saves is an artifact ``moecompose.load`` reads) and runs
``MoECausalLM.forward``. ``generate`` runs through transformers' ``GenerationMixin`` with
moecompose's KV cache.

``import moecompose`` registers the ``moecompose`` model type with ``AutoConfig`` and
``AutoModelForCausalLM`` when transformers is imported (before or after), without
importing it itself; every native artifact also carries ``auto_map`` and two small files
(:data:`REMOTE_CODE`), so ``trust_remote_code=True`` works wherever moecompose is
installed.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from moecompose.model.cache import KVCache
from moecompose.model.causal_lm import MoECausalLM
from moecompose.model.config import ModelConfig
from moecompose.model.parts import RotaryEmbedding, rope_inverse_frequencies

MODEL_TYPE = "moecompose"
# The name transformers gives the past keys and values, in and out ("cache" since 5.x).
_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} \
    else "past_key_values"


class MoeComposeConfig(PretrainedConfig):
    """A native ``config.json`` as a transformers config: every native key is an
    attribute; :meth:`native` gives the checked ``ModelConfig`` back."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("architectures", ["MoECausalLM"])
        # transformers reads "rope_scaling" as its own (deprecated) key and may rewrite it;
        # the native meaning is kept aside.
        self.moecompose_rope_scaling = kwargs.get("rope_scaling")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            super().__init__(**kwargs)

    def native(self) -> ModelConfig:
        data = self.to_dict()
        known = {k: data[k] for k in ModelConfig.model_fields if k in data}
        known["architectures"] = ("MoECausalLM",)
        known["rope_scaling"] = self.moecompose_rope_scaling
        return ModelConfig.from_dict(known)

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: the native config (every key, as ``build``
        writes it), ``auto_map`` and the transformers version."""
        out = self.native().to_dict()
        for key in ("auto_map", "transformers_version"):
            value = getattr(self, key, None)
            if value:
                out[key] = value
        return out


class MoeComposeForCausalLM(PreTrainedModel, GenerationMixin):
    """``MoECausalLM`` as a transformers causal LM (see the module docstring)."""

    config_class = MoeComposeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: MoeComposeConfig) -> None:
        super().__init__(config)
        native = MoECausalLM(config.native())  # applies the artifact's trainable set
        self.model = native.model
        self.lm_head = native.lm_head
        self.native_config = native.config
        self._unpadded_cache: KVCache | None = None  # see generate
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, then the artifact's trainable set (loading makes every
        parameter anew, trainable)."""
        model = super().from_pretrained(*args, **kwargs)
        MoECausalLM.set_trainable(model, model.native_config.trainable)
        return model

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only what state dicts leave out: the rotary frequencies (weights come from the
        artifact; a model made from a config alone keeps ``MoECausalLM``'s init)."""
        if isinstance(module, RotaryEmbedding):  # the model's, or its local layers' (Gemma 3)
            module.inv_freq = rope_inverse_frequencies(
                module.head_dim, module.theta, module.scaling
            ).to(module.inv_freq.device if module.inv_freq.device.type != "meta" else "cpu")

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """transformers' causal-LM call: ``loss`` is the next-token cross-entropy plus the
        weighted router losses (``aux_loss``), padding excluded from both."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MoeComposeForCausalLM takes input_ids (inputs_embeds is not supported)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"{type(cache).__name__} is not a moecompose KV cache; let "
                             "generate() make one, or use model.new_cache()")
        if cache is None and use_cache and not self.training:
            cache = MoECausalLM.new_cache(self)  # type: ignore[arg-type]
        out = MoECausalLM.forward(self, input_ids, attention_mask, position_ids,  # type: ignore[arg-type]
                                  cache, labels)
        return MoeCausalLMOutputWithPast(loss=out.loss, aux_loss=out.aux_loss, logits=out.logits,
                                         **{_CACHE: out.cache})

    new_cache = MoECausalLM.new_cache

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (a transformers Cache cannot hold MoA's)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``, decoding without masks where they hide nothing.

        Every step gets the prompt's attention mask (given, or made) followed by ones, so
        when the prompt's has no padding, the cache this call makes decodes without one
        (``prepare_inputs_for_generation``; one look at the mask per call) and attention
        takes its maskless paths (``KVCache.mask``). Newer transformers leave an all-ones
        mask out themselves; older ones (4.57) pass it at every step."""
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._unpadded_cache = None

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Only the tokens the cache does not hold yet, the whole attention mask, and the
        cache (one is made for the first call); no mask for the cache of a prompt without
        padding (see ``generate``)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            cache = self.new_cache()
            unpadded = attention_mask is None or bool(attention_mask.all())  # one host sync
            self._unpadded_cache = cache if unpadded else None
        if cache is self._unpadded_cache:
            attention_mask = None
        input_ids = input_ids[:, cache.length:]  # type: ignore[union-attr]
        return {"input_ids": input_ids, "attention_mask": attention_mask, _CACHE: cache,
                "use_cache": True}


    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any,
                        **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, then what makes the folder an artifact when
        the model was loaded from one: ``plan.json`` (the artifact's plan, every tensor a
        copy of the one saved here, the save recorded in ``derivations``), ``spec.yaml``,
        the tokenizer, the remote code, a model card and ``manifest.json``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        origin = Path(str(getattr(self.config, "_name_or_path", "") or ""))
        if kwargs.get("is_main_process", True) and (origin / "plan.json").is_file():
            write_artifact_files(Path(save_directory), origin)


def write_artifact_files(folder: Path, origin: Path) -> None:
    """Make ``folder``, holding a ``config.json`` and weights that transformers saved from a
    model loaded from the artifact ``origin``, an artifact (see ``save_pretrained``)."""
    import json
    import shutil
    from dataclasses import replace

    from moecompose.artifact import (
        DOMAINS_FILE,
        manifest,
        read_json,
        read_plan,
        sha256_file,
        stored_domains,
        write_text,
    )
    from moecompose.build.card import model_card
    from moecompose.dtypes import NAMES
    from moecompose.formats import native
    from moecompose.plan.recipe import Recipe, TensorRef
    from moecompose.sources.checkpoint import TOKENIZER_FILES, open_tensors, tensors_fingerprint
    from moecompose.spec import dump_data

    saved = open_tensors("the saved model", folder)
    base = read_plan(origin)
    tensors = []
    for t in base.tensors:
        entry = saved.get(t.name)
        if entry is None:
            raise ValueError(f"save_pretrained wrote no tensor '{t.name}' to {folder}")
        tensors.append(replace(t, dtype=NAMES[entry.dtype], recipe=Recipe(
            "copy", (TensorRef(SAVED, t.name),))))
    for name in (*TOKENIZER_FILES, DOMAINS_FILE):
        if (origin / name).is_file() and not (folder / name).exists():
            shutil.copyfile(origin / name, folder / name)
    plan = replace(
        base, tensors=tuple(tensors), config=read_json(folder, "config.json"),
        domains=stored_domains(base, folder),
        sources={**base.sources, SAVED: {"path": str(folder.resolve()), "kind": "checkpoint",
                                         "fingerprint": tensors_fingerprint(saved)}},
        derivations=(*base.derivations, {
            "operation": "save_pretrained", "from": str(origin.resolve()),
            "from_plan_digest": base.digest(),
        }),
    )
    files = {p.name: sha256_file(p) for p in folder.iterdir()
             if p.is_file() and p.name != "manifest.json"}
    texts = {"plan.json": plan.to_json(), "spec.yaml": dump_data(plan.spec),
             "README.md": model_card(plan), **native.remote_code()}
    for name, text in texts.items():
        files[name] = write_text(folder / name, text)
    write_text(folder / "manifest.json", json.dumps(manifest(plan, files), indent=2) + "\n")


SAVED = "@saved"  # the folder save_pretrained wrote, as a plan input


def register() -> None:
    """Register the ``moecompose`` model type with transformers' Auto classes (once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, MoeComposeConfig)
    except ValueError:  # registered already
        return
    AutoModelForCausalLM.register(MoeComposeConfig, MoeComposeForCausalLM)
