"""Training on an 8-bit base without bitsandbytes' memory overhead on the CPU.

In training mode bitsandbytes 0.50 runs an 8-bit linear on the CPU as `MatMul8bitFp`: dequantize the int8
weight, `F.linear`. Its forward keeps the input as a plain attribute (`ctx.A`) for a weight gradient that
a frozen base never needs, and a plain attribute is out of reach of gradient checkpointing, which can only
drop what `save_for_backward` saved: every decoder linear's input stays alive for the whole step, with or
without `--gradient-checkpointing` (measured on a 1B LLaMA shape, sequence 256: ~10 MB per layer; a 7B
shape's step peaked 4 GB above its weights). `FrozenInt8Linear` does the same arithmetic (the same
dequantization, the same dtypes, so the same loss and LoRA gradients, by test) and saves only the int8
weight and its row scales, which are parameters, not activations; and it dequantizes into one scratch
buffer shared by all the linears (DequantBuffer) instead of a fresh tensor per linear and pass.

Evaluation mode, a weight that trains, or a bias that trains go through bitsandbytes unchanged.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F


class DequantBuffer:
    """One scratch buffer that every 8-bit linear of a model dequantizes its weight into.

    bitsandbytes allocates a fresh dequantized weight (up to 180 MB in fp32 at 7B) for every linear, twice
    a step: that churn costs page faults and fragments glibc's heaps (freed pages stay resident). The
    linears run one at a time and their outputs do not alias the weight, so one buffer, as large as the
    largest weight in the largest dtype asked for, serves them all."""

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def dequantize(self, cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """int8 weight [out, in] with fp32 row scales [out] -> [out, in] in `dtype`, computed as bitsandbytes
        computes it (`cb.to(dtype).mul_(scb[:, None] / 127)`), in the shared buffer."""
        nbytes = cb.numel() * dtype.itemsize
        if self._bytes.numel() < nbytes or self._bytes.device != cb.device:
            self._bytes = torch.empty(0, dtype=torch.uint8)  # free the old one before the larger one
            self._bytes = torch.empty(nbytes, dtype=torch.uint8, device=cb.device)
        out = self._bytes[:nbytes].view(dtype).view(cb.shape)
        return out.copy_(cb).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


class _FrozenInt8Matmul(torch.autograd.Function):
    """y = x @ dequant(W)^T + b for a frozen int8 W (and frozen b); only the input gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                buffer: DequantBuffer) -> torch.Tensor:
        ctx.save_for_backward(cb, scb)  # parameters: saving them copies nothing
        ctx.input_dtype, ctx.buffer = x.dtype, buffer
        return F.linear(x, buffer.dequantize(cb, scb, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        cb, scb = ctx.saved_tensors
        weight = ctx.buffer.dequantize(cb, scb, ctx.input_dtype)
        return grad_out.to(ctx.input_dtype) @ weight, None, None, None, None


class FrozenInt8Linear(bnb.nn.Linear8bitLt):
    """bitsandbytes' 8-bit linear whose training-mode forward keeps no activation (see the module doc).

    Still a `bnb.nn.Linear8bitLt`, so PEFT wraps it with its 8-bit LoRA layer as before."""

    dequant_buffer: DequantBuffer  # shared by the model's 8-bit linears (set by lean_int8_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not (self.training and frozen and not self.state.has_fp16_weights):
            return super().forward(x)
        if self.weight.CB is not None:  # the first forward moves the int8 weight into the matmul state
            self.init_8bit_state()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _FrozenInt8Matmul.apply(x, self.state.CB, self.state.SCB, bias, self.dequant_buffer)


def lean_int8_training(model: torch.nn.Module) -> int:
    """Make every bitsandbytes 8-bit linear of `model` a FrozenInt8Linear (same weights, same module);
    returns how many. Call after loading, before PEFT wraps the model."""
    count, buffer = 0, DequantBuffer()
    for module in model.modules():
        if type(module) is bnb.nn.Linear8bitLt:
            module.__class__ = FrozenInt8Linear
            module.dequant_buffer = buffer
            count += 1
    return count
