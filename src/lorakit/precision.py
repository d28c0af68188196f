"""Choose the numeric precision for training: bf16 where the hardware runs it fast, else fp32.

`auto` picks bf16 on a CUDA GPU that supports it, or on a CPU with native bf16 instructions
(AMX-BF16 or AVX512-BF16); everything else trains in fp32. With bf16 the frozen base weights are
stored in bf16 and matmuls run under autocast, while LoRA weights and optimizer state stay fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lorakit.errors import ConfigError


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_supported(device: str | None = None) -> bool:
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: str | None = None) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the precision actually used ('fp32', 'bf16' or 'fp16')."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"--precision bf16 is not supported on this {device}; use fp32 (or auto)")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"unknown precision {precision!r}")
    return precision


def weights_dtype(precision: str):
    """dtype for the frozen base weights under a resolved precision."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
