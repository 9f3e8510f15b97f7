"""Native artifacts in the Hugging Face ecosystem: Auto classes (registered and remote
code), generate, Trainer, PEFT, save_pretrained back into an artifact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import moecompose
from moecompose.artifact import read_plan, verify_files
from moecompose.hf import MoeComposeForCausalLM

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
BUNDLED = sorted(p.stem for p in SPECS.glob("*.yaml"))


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every bundled spec built in the native format, once."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for name in BUNDLED:
        spec = moecompose.load_spec(SPECS / f"{name}.yaml").with_({"output.format": "native"})
        out[name] = moecompose.build(spec, root / name).path
    return out


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_auto_model_gives_our_logits_and_tokens(name: str, native: dict[str, Path],
                                                tmp_path: Path) -> None:
    path = native[name]
    ours = moecompose.load(path)
    x = ids()
    expected = ours(x).logits
    tokens = ours.generate(x, 6)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    for model in (AutoModelForCausalLM.from_pretrained(path),
                  AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)):
        assert isinstance(model, MoeComposeForCausalLM) and not model.training
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
        out = model.generate(x, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, tokens)


def test_generate_leaves_out_masks_that_hide_nothing(native: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """For a prompt without padding (its mask all ones, given or not) decoding attends
    without a mask tensor and gives our greedy tokens; a padded prompt keeps its masks.
    (transformers 4.57 passes the all-ones mask at every step, newer ones leave it out.)"""
    path = native["bam"]
    model = AutoModelForCausalLM.from_pretrained(path)
    masks: list[bool] = []  # whether each attention call got a mask tensor
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):  # type: ignore[no-untyped-def]
        masks.append(attn_mask is not None)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    x = ids()
    expected = moecompose.load(path).generate(x, 4)
    masks.clear()
    for mask in ({"attention_mask": torch.ones_like(x)}, {}):
        out = model.generate(x, max_new_tokens=4, do_sample=False, **mask)
        assert torch.equal(out, expected)
        assert masks and not any(masks)
        masks.clear()
    padded = torch.ones_like(x)
    padded[0, :2] = 0
    model.generate(x, attention_mask=padded, max_new_tokens=4, do_sample=False)
    assert masks and all(masks)
    assert model._unpadded_cache is None  # the generation's cache is not kept


def test_the_config_round_trips_to_the_native_one(native: dict[str, Path]) -> None:
    from moecompose.loader import artifact_config

    path = native["nexus"]
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "moecompose"
    native_config = artifact_config(path)[1].to_dict()
    assert native_config.pop("auto_map") == config.auto_map
    assert config.native().to_dict() == native_config


def test_loss_is_lm_plus_aux_loss(native: dict[str, Path]) -> None:
    path = native["btx"]
    model = AutoModelForCausalLM.from_pretrained(path)
    x = ids()
    out = model(x, labels=x)
    ours = moecompose.load(path)(x, labels=x)
    torch.testing.assert_close(out.loss, ours.loss)
    assert out.aux_loss > 0


def test_trainable_set_of_the_artifact_is_applied(native: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(native["pesc"])
    groups = {t.name: t.group for t in read_plan(native["pesc"]).tensors}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, g in groups.items() if g in ("router", "adapters")}


def test_without_moecompose_remote_code_says_how_to_install(native: dict[str, Path],
                                                            tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(native["demo"], copy)
    script = ("import sys; sys.modules['moecompose'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(copy)!r}, trust_remote_code=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: this model needs the moecompose package: pip install 'moecompose>=")


@pytest.mark.slow
def test_trainer_trains_bam_and_saves_an_artifact(native: dict[str, Path], tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    path = native["bam"]
    model = AutoModelForCausalLM.from_pretrained(path)
    rows = ids(40, 32, seed=1)
    rows[:, 1::2] = rows[:, ::2]  # a pattern to learn: every token repeats the one before

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": rows[i], "labels": rows[i]}

    losses: list[float] = []
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                             max_steps=5, learning_rate=3e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 5 and losses[-1] < losses[0] and result.training_loss > 0
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    x = ids()
    theirs = AutoModelForCausalLM.from_pretrained(out)(x).logits
    ours = moecompose.load(out)(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, moecompose.load(path)(x).logits)  # it did train
    assert verify_files(out) == []
    assert read_plan(out).derivations[-1]["operation"] == "save_pretrained"


def test_saved_model_extends_like_an_artifact(native: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(native["nexus"])
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert verify_files(saved) == []
    extended = moecompose.extend(saved, tmp_path / "ext", expert="base",
                                 source=SPECS / "dense/base",
                                 domain_texts=str(SPECS / "data/train/code/*.txt"))
    lam = read_plan(extended.path).derivations[-1]["lambda"]
    base = load_file(SPECS / "dense/base/model.safetensors")["model.norm.weight"]
    expected = (1 - lam) * model.model.norm.weight.detach() + lam * base
    torch.testing.assert_close(moecompose.load(extended.path).model.norm.weight.detach(), expected)


def test_peft_lora_on_attention_trains_and_merges(native: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    path = native["btx"]
    model = AutoModelForCausalLM.from_pretrained(path)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 16)
    first = lora(input_ids=x, labels=x).loss
    for _ in range(5):
        loss = lora(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert lora(input_ids=x, labels=x).loss < first
    with torch.no_grad():
        adapted = lora(input_ids=x).logits
    merged = lora.merge_and_unload()
    assert isinstance(merged, MoeComposeForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(moecompose.load(tmp_path / "merged")(x).logits, adapted,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_exports_carry_the_spec_aux_loss_and_transformers_pools_it_over_layers(
        fmt: str, tmp_path: Path) -> None:
    """transformers' load-balancing loss, with the coefficient and switch the export
    writes, is k * E * sum_e f_e * P_e over the router outputs of all layers pooled, and
    has no z-loss; moecompose's is the sum over layers of E * sum_e f_e * P_e per layer
    (f normalised over the k assignments) plus the z-loss."""
    spec = moecompose.load_spec(SPECS / "btx.yaml").with_({
        "output.format": fmt,
        "layers[0].ffn.aux_loss": {"load_balance": 0.02, "z_loss": 0.001},
        **({"layers[0].ffn.shared": "seed"} if fmt == "qwen2_moe" else {}),
    })
    path = moecompose.build(spec, tmp_path / fmt).path
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    assert theirs.config.output_router_logits is True
    assert theirs.config.router_aux_loss_coef == 0.02
    x = ids(3, 13)
    out = theirs(x, labels=x)
    logits = [g.reshape(-1, g.shape[-1]).float() for g in out.router_logits]  # L x [T, E]
    E, k = logits[0].shape[-1], theirs.config.num_experts_per_tok

    def balance(pieces: list[torch.Tensor]) -> torch.Tensor:
        probs = torch.cat(pieces).softmax(-1)
        counts = torch.zeros(E).scatter_add_(0, probs.topk(k, -1).indices.reshape(-1),
                                             torch.ones(probs.shape[0] * k))
        return E * (counts / counts.sum() * probs.mean(0)).sum()

    torch.testing.assert_close(out.aux_loss, k * balance(logits))
    ours = moecompose.load(path)(x, labels=x)
    z = sum(torch.logsumexp(g, -1).square().mean() for g in logits)
    torch.testing.assert_close(ours.aux_loss, 0.02 * sum(balance([g]) for g in logits) + 0.001 * z)
    ce = out.loss - 0.02 * out.aux_loss
    torch.testing.assert_close(ours.loss - ours.aux_loss, ce, rtol=1e-5, atol=1e-5)


def test_lm_eval_harness_log_likelihoods_equal_ours(native: dict[str, Path]) -> None:
    """Optional: lm-evaluation-harness's HF model class on a native artifact (runs when
    lm_eval is installed)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path = native["nexus"]
    harness = HFLM(pretrained=str(path), device="cpu", batch_size=2)
    requests = [("def f(x):", " return x"), ("The licence", " grants"), ("a = 1\n", "b = 2")]
    got = harness.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)],
                                disable_tqdm=True)
    from moecompose.training.data import TextTokenizer

    model = moecompose.load(path)
    tokenizer = TextTokenizer.from_artifact(path, None)
    for (context, continuation), (logprob, _) in zip(requests, got):
        spaces = len(context) - len(context.rstrip())  # the harness moves them to the continuation
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        a, b = tokenizer.encode(context), tokenizer.encode(continuation)
        x = torch.tensor([a + b])
        logits = model(x).logits.log_softmax(-1)[0]
        ours = sum(logits[len(a) - 1 + j, t] for j, t in enumerate(b))
        assert logprob == pytest.approx(float(ours), abs=1e-4), lm_eval.__version__
