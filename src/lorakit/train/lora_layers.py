"""Cheaper LoRA internals for training on the CPU, same model and adapter format.

Two costs of PEFT's LoRA forward that dominate next to a small rank
(figures: docs/performance.md#lora-dropout-and-input-casting):

- `FastDropout` draws where the dropped elements are instead of one random float per element: the
  gaps between them in a sequence of independent Bernoulli(p) trials are geometric, so about p * n
  uniform draws (turned into gaps by one vectorised log) place all of them. The backward pass needs
  only those positions.
- `cast_input_dtype_enabled = False` (PEFT's own switch, see `peft.helpers.disable_input_dtype_casting`)
  leaves the input in bf16 under autocast instead of a full fp32 copy per adapted module; the LoRA
  weights, their gradients and the optimizer state stay fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def dropped_positions(n: int, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Sorted int64 indices in [0, n) of the elements a Bernoulli(p) dropout drops, each independently.

    Gap j between consecutive drops is geometric: P(j) = (1 - p)^(j - 1) p, drawn as
    1 + floor(log(1 - U) / log(1 - p)) from uniform U (24-bit: gaps beyond 2^24 in probability are cut)."""
    draws = int(n * p + 6 * math.sqrt(n * p) + 16)  # the gaps cover n but for ~1e-9 of calls
    scale = 1.0 / math.log1p(-p)
    chunks, last = [], -1
    while last < n - 1:
        gaps = torch.rand(draws, device=device).neg_().log1p_().mul_(scale).long().add_(1)
        chunks.append(gaps.cumsum_(0).add_(last))
        last = int(chunks[-1][-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, n))]


class _ZeroAt(torch.autograd.Function):
    """y = x * scale with the given flat positions zeroed; the gradient is the same operation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        out = (x * scale).contiguous()
        out.view(-1).index_fill_(0, positions, 0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        grad_x = (grad * ctx.scale).contiguous()
        grad_x.view(-1).index_fill_(0, positions, 0)
        return grad_x, None, None


class FastDropout(nn.Module):
    """Inverted dropout that draws the positions of the dropped elements, not one number per element."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":  # GPUs draw masks in parallel; positions would cost a sync per call
            return nn.functional.dropout(x, self.p, training=True)
        return _ZeroAt.apply(x, dropped_positions(x.numel(), self.p, x.device), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def speed_up_lora(peft_model: nn.Module, precision: str) -> int:
    """Swap every LoRA `nn.Dropout` for `FastDropout`; under bf16/fp16 keep LoRA inputs in that dtype.

    Returns how many dropout modules were swapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = 0
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if precision in ("bf16", "fp16"):
            module.cast_input_dtype_enabled = False
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = FastDropout(dropout.p).train(dropout.training)
                swapped += 1
    return swapped
