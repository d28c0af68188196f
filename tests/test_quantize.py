"""Quantized bases (bitsandbytes 8-bit / 4-bit on the CPU) and gradient checkpointing: lorakit's training
pieces on a quantized base against plain HF + PEFT on the same quantized model, and the refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.config import build_config
from lorakit.data import read_examples, tokenize_examples
from lorakit.data.collators import make_collator
from lorakit.errors import ConfigError
from lorakit.models import load_model, load_tokenizer
from lorakit.models.quantize import bnb_config, merge_allowed, validate_quantization
from lorakit.precision import bf16_supported, weights_dtype
from lorakit.prompts import get_prompter
from lorakit.train.config import FinetuneConfig

PRECISIONS = ["fp32", "bf16"] if bf16_supported("cpu") else ["fp32"]


def qopts(quantization: str, checkpointing: bool = False, quant_type: str = "nf4", double: bool = True):
    return SimpleNamespace(quantization=quantization, bnb_4bit_quant_type=quant_type, bnb_4bit_double_quant=double,
                           gradient_checkpointing=checkpointing)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def features(tok, tiny_alpaca_json):
    examples, _ = read_examples(tiny_alpaca_json)
    return tokenize_examples(examples[:4], get_prompter("alpaca_short", tok), tok, cutoff_len=96,
                             train_on_inputs=False)


def _lora(model, precision: str, lorakit: bool, dropout: float = 0.0):
    """All-linear LoRA with a random B drawn by name, the same for every model built here."""
    from peft import LoraConfig, get_peft_model

    from lorakit.train.lora_layers import speed_up_lora

    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(1)
    for name, p in sorted(peft.named_parameters()):
        if p.requires_grad:
            p.data = p.data.float()
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.05
    if lorakit:
        speed_up_lora(peft, precision)
    return peft.train()


def plain_model(model_dir, quantization: str, precision: str):
    """HF + PEFT as their documentation has it: BitsAndBytesConfig, prepare_model_for_kbit_training, LoRA."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(precision))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(precision),
                                                     quantization_config=bnb_config(qopts(quantization),
                                                                                    weights_dtype(precision)))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return _lora(model, precision, False)


def lorakit_model(model_dir, quantization: str, precision: str, checkpointing: bool, dropout: float = 0.0):
    """What train/engine.py builds: lorakit's loader and preparation, fused loss, RMSNorm, packed attention,
    FastDropout/bf16 LoRA inputs."""
    from lorakit.models.rmsnorm import swap_rmsnorms
    from lorakit.train.loss import FusedLMHead, install_training_loss
    from lorakit.train.memory import prepare_base
    from lorakit.train.packed_attention import use_packed_attention

    opts = qopts(quantization, checkpointing)
    model = load_model(model_dir, weights_dtype(precision), quantization=opts)
    model.config.use_cache = False
    model = prepare_base(model, opts)
    assert install_training_loss(model) and isinstance(model.lm_head, FusedLMHead)  # the head is not quantized
    assert swap_rmsnorms(model) > 0 and use_packed_attention(model)
    assert model.is_activation_checkpointing == checkpointing
    return _lora(model, precision, True, dropout)


def loss_and_grads(model, batch: dict, precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_lorakit_training_step_on_a_quantized_base_equals_hf_peft(tiny_model_dir, tok, features, quantization,
                                                                 precision):
    """Padded batch through plain HF+PEFT vs the packed row through every lorakit fast path, with and
    without gradient checkpointing: same loss and LoRA gradients on the same (quantized) weights."""
    padded = make_collator(tok, padding_free=False)([dict(f) for f in features])
    packed = make_collator(tok, padding_free=True)([dict(f) for f in features])
    ref_loss, ref_grads = loss_and_grads(plain_model(tiny_model_dir, quantization, precision), padded, precision)
    rel = 1e-4 if precision == "fp32" else 2e-2
    for checkpointing in (False, True):
        model = lorakit_model(tiny_model_dir, quantization, precision, checkpointing)
        loss, grads = loss_and_grads(model, packed, precision)
        assert loss == pytest.approx(ref_loss, rel=rel), (checkpointing, loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
        for name, g in grads.items():
            scale = ref_grads[name].abs().max()
            assert scale > 0, name
            assert (g - ref_grads[name]).abs().max() <= (1e-3 if precision == "fp32" else 5e-2) * scale, name


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_checkpointing_replays_the_lora_dropout(tiny_model_dir, tok, features, quantization):
    """FastDropout draws again in the recomputed forward: torch's checkpoint restores the RNG, so a run with
    dropout gets the same gradients with and without gradient checkpointing."""
    packed = make_collator(tok, padding_free=True)([dict(f) for f in features])
    results = []
    for checkpointing in (False, True):
        model = lorakit_model(tiny_model_dir, quantization, "fp32", checkpointing, dropout=0.3)
        torch.manual_seed(7)
        results.append(loss_and_grads(model, packed, "fp32"))
    (loss0, grads0), (loss1, grads1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, atol=1e-6, rtol=1e-4)
    torch.manual_seed(8)  # and the dropout is really on: another draw, another loss
    assert loss_and_grads(model, packed, "fp32")[0] != pytest.approx(loss0, rel=1e-6)


def test_bnb_config_follows_the_flags():
    c = bnb_config(qopts("4bit", quant_type="fp4", double=False), torch.bfloat16)
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "fp4" and not c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.bfloat16
    c = bnb_config(qopts("4bit"), torch.float32)
    assert c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant and c.bnb_4bit_compute_dtype == torch.float32
    assert bnb_config(qopts("8bit"), torch.float32).load_in_8bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
def test_4bit_knobs_reach_the_weights(tiny_model_dir, quant_type, double):
    model = load_model(tiny_model_dir, torch.float32, quantization=qopts("4bit", quant_type=quant_type, double=double))
    weight = model.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.quant_type == quant_type
    assert weight.quant_state.nested == double


def test_refusals_at_config_time(tiny_model_dir, tiny_alpaca_json, monkeypatch):
    base = dict(base_model=str(tiny_model_dir), data_path=str(tiny_alpaca_json), quantization="4bit")
    with pytest.raises(ConfigError, match=r"--quantization 4bit trains in one process: --nproc 2"):
        build_config(FinetuneConfig, {**base, "nproc": "2"})
    assert build_config(FinetuneConfig, {**base, "nproc": "1"}).quantization == "4bit"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package, which is not installed"):
        build_config(FinetuneConfig, base)
    validate_quantization(qopts("none"))  # nothing asked, nothing needed


def test_adapters_are_not_merged_into_quantized_weights():
    assert merge_allowed(qopts("none"), True, 2) is True
    assert merge_allowed(qopts("4bit"), True, 1) is False
    assert merge_allowed(qopts("8bit"), False, 1) is False
    with pytest.raises(ConfigError, match="--no-merge"):
        merge_allowed(qopts("4bit"), True, 2)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_streaming_load_equals_transformers_load(tiny_model_dir, quantization):
    """lorakit reads the checkpoint tensor by tensor (pread, see quantize.load_streaming): the same quantized
    weights as transformers' own from_pretrained on the folder, and the model still knows its folder."""
    from transformers import AutoModelForCausalLM

    mine = load_model(tiny_model_dir, torch.float32, quantization=qopts(quantization))
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                  quantization_config=bnb_config(qopts(quantization), torch.float32))
    a, b = mine.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert mine.name_or_path == str(tiny_model_dir) and mine.hf_quantizer is not None
    kind = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    assert type(mine.model.layers[0].mlp.up_proj).__name__ == kind


def test_finetune_with_gradient_checkpointing_logs_the_same_losses(tiny_model_dir, tiny_alpaca_json, tmp_path):
    """The whole training path (Trainer, padding-free batches, LoRA dropout on) with and without
    --gradient-checkpointing: the same loss at every step and the same adapter."""
    import json

    from safetensors.torch import load_file

    from lorakit.train.finetune import finetune

    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        finetune(build_config(FinetuneConfig, dict(
            base_model=str(tiny_model_dir), data_path=str(tiny_alpaca_json), output_dir=str(out),
            gradient_checkpointing=checkpointing, precision="fp32", batch_size=8, micro_batch_size=4, max_steps=3,
            learning_rate=3e-3, warmup_steps=0, val_set_size=0, cutoff_len=96, logging_steps=1, nproc="1")))
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        runs[checkpointing] = ([r["loss"] for r in log if "loss" in r], load_file(out / "adapter_model.safetensors"))
    (plain, w_plain), (ckpt, w_ckpt) = runs[False], runs[True]
    assert len(plain) == 3 and plain == pytest.approx(ckpt, rel=1e-5)
    for k, w in w_plain.items():
        torch.testing.assert_close(w_ckpt[k], w, atol=1e-6, rtol=1e-4)


def test_a_quantized_base_under_a_multi_process_launcher_is_refused():
    """torchrun/accelerate started by hand (WORLD_SIZE 2): refused before training starts."""
    from lorakit.train.memory import prepare_base

    with pytest.raises(ConfigError, match="quantized base trains in one process, not 2"):
        prepare_base(torch.nn.Linear(2, 2), qopts("4bit"), processes=2)
