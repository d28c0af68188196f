"""One RMSNorm for lorakit's module swaps: a hand-written backward for training, the fused
`F.rms_norm` for inference.

Training: transformers' LlamaRMSNorm is six autograd ops (upcast, pow, mean, rsqrt, multiply, cast) plus the
weight product, and autograd replays each in the backward. `RMSNormFunction` keeps x and the [N, 1]
reciprocal RMS and computes the input gradient in one fp32 expression
(docs/performance.md#rmsnorm-with-a-hand-written-backward). The forward is bit-identical to
transformers'; the gradient agrees to ~2e-5 (it rounds once, at the end). Inference (no gradient
wanted): one fused `F.rms_norm` call, fewer and larger ops for decoding (see generate/cpu_inference.py),
equal to transformers' within bf16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models.families import classes
from lorakit.models.swap import swap_modules

# Norms whose forward is exactly weight * (x * rsqrt(mean(x^2) + eps)).to(dtype): not Gemma's (1 + weight).
SAME_MATH = classes("norm_class", "plain_rmsnorm")


class RMSNormFunction(torch.autograd.Function):
    """x [..., H], weight [H] -> weight * (x / rms(x) computed in fp32, cast to x's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.float() * inv_rms
        grad_normed = (grad_out * weight).float()
        # d/dx of x * inv_rms(x): inv_rms * (g - normed * mean(g * normed))
        grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)) * inv_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).float().reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """Stands in for a transformers RMSNorm; holds the same weight Parameter (same state-dict key)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def swap_rmsnorms(model: nn.Module) -> int:
    """Swap every RMSNorm of a known same-math class for `RMSNorm`; returns how many."""
    return swap_modules(model, lambda m: RMSNorm(m) if type(m).__name__ in SAME_MATH else None)
