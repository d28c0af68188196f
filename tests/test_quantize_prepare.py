"""lorakit's k-bit preparation (models/quantize.prepare_for_kbit_training) against PEFT's
`prepare_model_for_kbit_training` on the same bitsandbytes-quantized tiny LLaMA: the frozen embeddings and
lm_head stay in the compute dtype (PEFT upcasts them to fp32), with the same loss and LoRA gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.models.quantize import bnb_config, prepare_for_kbit_training
from lorakit.precision import bf16_supported
from test_quantize import _lora, qopts
from tiny_models import make_tiny_llama

DTYPES = [torch.float32, torch.bfloat16] if bf16_supported("cpu") else [torch.float32]


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


def quantized(model_dir: Path, quantization: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 quantization_config=bnb_config(qopts(quantization), dtype))
    model.config.use_cache = False
    return model


def with_lora(model):
    """All-linear LoRA (fp32) with a random B drawn by name, the same on every model built here."""
    return _lora(model, "fp32", lorakit=False)


def step(model, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_frozen_embeddings_and_head_keep_the_compute_dtype(tiny_model_dir, tied_model_dir, quantization, dtype):
    for folder in (tiny_model_dir, tied_model_dir):
        model = prepare_for_kbit_training(quantized(folder, quantization, dtype), gradient_checkpointing=False)
        assert model.get_input_embeddings().weight.dtype == dtype
        assert model.get_output_embeddings().weight.dtype == dtype
        assert model.model.norm.weight.dtype == torch.float32  # norms in fp32, as PEFT
        assert all(layer.input_layernorm.weight.dtype == torch.float32 for layer in model.model.layers)
        assert not any(p.requires_grad for p in model.parameters())
        hidden = model.model.embed_tokens(torch.tensor([[3, 4]]))
        assert hidden.dtype == torch.float32  # the residual stream starts in fp32, as under PEFT


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_loss_and_lora_gradients_equal_peft_preparation(tiny_model_dir, tied_model_dir, quantization, dtype):
    from peft import prepare_model_for_kbit_training

    for folder in (tiny_model_dir, tied_model_dir):
        for checkpointing in (False, True):
            ref = prepare_model_for_kbit_training(quantized(folder, quantization, dtype),
                                                  use_gradient_checkpointing=checkpointing,
                                                  gradient_checkpointing_kwargs={"use_reentrant": False})
            assert ref.get_input_embeddings().weight.dtype == torch.float32  # what lorakit avoids
            ref_loss, ref_grads = step(with_lora(ref), dtype)
            ours = with_lora(prepare_for_kbit_training(quantized(folder, quantization, dtype), checkpointing))
            loss, grads = step(ours, dtype)
            assert torch.isfinite(loss) and loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
            assert grads.keys() == ref_grads.keys() and grads
            for name, g in grads.items():
                scale = ref_grads[name].abs().max()
                assert scale > 0, name
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6 * scale.item(), msg=name)
