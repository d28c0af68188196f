"""Weight types and compute precision: the one table of their names, and the choice of precision.

Two ideas, two flags:
- `--dtype` (merge, export; `--outtype` is export's alias for llama.cpp users) is the weight type of
  a file being written: `f32`, `f16`, `bf16`, and for GGUF also `q8_0`.
- `--precision` (finetune, pretrain, eval, demo, generate, infer, serve, webui) is the arithmetic a run
  uses: `auto`, `fp32`, `bf16` or `fp16`. `auto` picks bf16 on a CUDA GPU that supports it, or on a
  CPU with native bf16 instructions (AMX-BF16 or AVX512-BF16), else fp32. Training under bf16 keeps
  the frozen base weights in bf16 and runs matmuls under autocast, while LoRA weights and optimizer
  state stay fp32; inference holds the model in the chosen precision.

`WEIGHT_TYPES` maps each documented spelling to its torch dtype, GGUF tensor and file types,
safetensors dtype and precision name. Every verb reads names through `weight_type`, which also takes
the other spellings users have in scripts (float16, fp16, half, bfloat16, float32, fp32, F16...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WeightType:
    """One weight type under each name it goes by."""

    name: str                # the documented spelling (--dtype): also llama.cpp's --outtype name
    torch: str | None        # torch dtype name; None for a GGUF block quantization
    gguf: str                # gguf.GGMLQuantizationType of 2-D weights (norms and 1-D tensors stay F32)
    gguf_file_type: str      # gguf.LlamaFileType written to general.file_type
    safetensors: str | None  # safetensors dtype name; None: not storable as safetensors / pth
    precision: str | None    # the --precision spelling of the same arithmetic; None: not a compute type


WEIGHT_TYPES: dict[str, WeightType] = {t.name: t for t in (
    WeightType("f32", "float32", "F32", "ALL_F32", "F32", "fp32"),
    WeightType("f16", "float16", "F16", "MOSTLY_F16", "F16", "fp16"),
    WeightType("bf16", "bfloat16", "BF16", "MOSTLY_BF16", "BF16", "bf16"),
    WeightType("q8_0", None, "Q8_0", "MOSTLY_Q8_0", None, None),
)}
FLOAT_TYPES = ("f32", "f16", "bf16")  # the weight types a safetensors or pth file can hold
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_EXTRA_SPELLINGS = {"half": "f16", "float": "f32"}


def _spellings() -> dict[str, str]:
    names = dict(_EXTRA_SPELLINGS)
    for t in WEIGHT_TYPES.values():
        for spelling in (t.name, t.torch, t.safetensors, t.precision):
            if spelling:
                names[spelling.lower()] = t.name
    return names


def weight_type(spelling: str, allowed: tuple[str, ...] | None = None, flag: str = "--dtype") -> WeightType:
    """Any spelling of a weight type ('f16', 'float16', 'fp16', 'F16', 'torch.float16') -> its table row.

    `allowed` limits the documented names a caller takes (e.g. FLOAT_TYPES); anything else raises a
    ConfigError naming `flag` and the values it accepts."""
    allowed = allowed or tuple(WEIGHT_TYPES)
    name = _spellings().get(str(spelling).removeprefix("torch.").lower())
    if name is None or name not in allowed:
        raise ConfigError(f"{flag} {spelling}: not one of {', '.join(allowed)}")
    return WEIGHT_TYPES[name]


def torch_dtype(spelling: str | torch.dtype) -> torch.dtype:
    """Any float weight-type or precision spelling (or a torch.dtype) -> the torch.dtype."""
    import torch

    if isinstance(spelling, torch.dtype):
        return spelling
    return getattr(torch, weight_type(spelling, FLOAT_TYPES).torch)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_supported(device: str | None = None) -> bool:
    """True when `device` (default: CUDA if present, else CPU) computes bf16 natively."""
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: str | None = None) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' (or another spelling of these, e.g. 'f32') -> the precision
    actually used ('fp32', 'bf16' or 'fp16')."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in PRECISIONS and _spellings().get(precision.lower()) in FLOAT_TYPES:
        precision = weight_type(precision, FLOAT_TYPES, "--precision").precision
    if precision == "fp16" and device != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"--precision bf16 is not supported on this {device}; use fp32 (or auto)")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"unknown precision {precision!r}")
    return precision


def weights_dtype(precision: str) -> torch.dtype:
    """dtype for the frozen base weights under a resolved precision."""
    return torch_dtype(precision)
