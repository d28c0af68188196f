"""models/int8_training.py: an 8-bit base's linears in training keep no activation alive, compute what
bitsandbytes computes (the loss and LoRA gradients against PEFT's preparation are in
test_quantize_prepare.py), and leave evaluation to bitsandbytes."""

from __future__ import annotations

import gc
import weakref

import bitsandbytes as bnb
import pytest
import torch

from lorakit.models.int8_training import FrozenInt8Linear, lean_int8_training
from lorakit.models.quantize import prepare_for_kbit_training
from test_quantize_prepare import quantized, with_lora


def int8_linear(lean: bool) -> bnb.nn.Linear8bitLt:
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 48, bias=True)
    layer = bnb.nn.Linear8bitLt(32, 48, bias=True, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes the weight
    for p in layer.parameters():
        p.requires_grad = False
    if lean:
        lean_int8_training(torch.nn.Sequential(layer))
    return layer.train()


def input_kept_alive(layer: torch.nn.Module) -> bool:
    """Whether the layer's output keeps its (non-leaf) input alive until the backward pass."""
    x = torch.randn(4, 32, requires_grad=True)
    hidden = x * 2.0  # the multiplication by a constant saves nothing: only the layer could hold `hidden`
    ref = weakref.ref(hidden)
    out = layer(hidden)
    del hidden
    gc.collect()
    alive = ref() is not None
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return alive


def test_the_input_is_not_kept_for_a_frozen_weight():
    assert input_kept_alive(int8_linear(lean=False))  # bitsandbytes' MatMul8bitFp keeps it as ctx.A
    assert not input_kept_alive(int8_linear(lean=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_input_gradient_equal_bitsandbytes(dtype):
    outputs, grads = [], []
    for lean in (False, True):
        x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        out = int8_linear(lean)(x)
        out.backward(torch.ones_like(out))
        outputs.append(out.detach())
        grads.append(x.grad)
    assert outputs[0].dtype == outputs[1].dtype == dtype
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_evaluation_and_trainable_weights_go_through_bitsandbytes():
    lean, plain = int8_linear(lean=True).eval(), int8_linear(lean=False).eval()
    x = torch.randn(2, 32)
    with torch.no_grad():  # eval runs LLM.int8 with its outlier threshold: not the training dequantization
        torch.testing.assert_close(lean(x), plain(x), rtol=0, atol=0)


def test_prepared_8bit_model_gets_lean_linears_that_peft_still_wraps(tiny_model_dir):
    model = prepare_for_kbit_training(quantized(tiny_model_dir, "8bit", torch.float32), gradient_checkpointing=True)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert linears and all(type(m) is FrozenInt8Linear for m in linears)
    assert lean_int8_training(model) == 0  # already done, nothing left to convert
    peft = with_lora(model)
    wrapped = [m for m in peft.modules() if type(m).__name__ == "Linear8bitLt" and hasattr(m, "lora_A")]
    assert len(wrapped) == len(linears)  # PEFT's 8-bit LoRA layer around every one


def test_a_4bit_model_is_left_alone(tiny_model_dir):
    model = prepare_for_kbit_training(quantized(tiny_model_dir, "4bit", torch.float32), gradient_checkpointing=False)
    assert not any(isinstance(m, FrozenInt8Linear) for m in model.modules())


def test_one_buffer_serves_every_shape_and_dtype():
    from lorakit.models.int8_training import DequantBuffer

    gen = torch.Generator().manual_seed(3)
    weights = [(torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8), torch.rand(shape[0], generator=gen))
               for shape in [(6, 4), (16, 8), (3, 5)]]
    buffer = DequantBuffer()
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        for cb, scb in weights:
            expected = cb.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))  # bitsandbytes' own expression
            got = buffer.dequantize(cb, scb, dtype)
            assert got.shape == cb.shape and got.dtype == dtype
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert buffer._bytes.numel() == 16 * 8 * 4  # the largest weight in fp32, once
