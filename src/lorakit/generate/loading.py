"""Choices made when the engine loads a model: prompt template, tokenizer source, weights dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_dtype(precision: str) -> torch.dtype:
    """--precision of an inference run -> the dtype the model is held (and computes) in. `auto`: bf16
    where the CPU/GPU computes in bf16, else fp32 (why bf16 weights: docs/performance.md#bf16-weights)."""
    from lorakit.precision import bf16_supported, torch_dtype

    if precision == "auto":
        return torch_dtype("bf16" if bf16_supported() else "fp32")
    return torch_dtype(precision)
