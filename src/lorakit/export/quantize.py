"""Quantized GGUF types (q4_0 ... q6_k), made by llama.cpp's own quantizer through llama-cpp-python.

lorakit writes the model as an f16 (or bf16, for bf16 sources) GGUF first, then `llama_model_quantize`
turns it into the requested type exactly as `llama-quantize` does (k-quant mixes such as q4_K_M keep
some tensors at q6_K; rows not divisible by a k-quant's 256-element block fall back to llama.cpp's
own choice). An importance matrix (`--imatrix`, llama.cpp's GGUF imatrix format) is passed through.

The module imports nothing heavy at import time: `QUANT_TYPES` builds the CLI's choices.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, LorakitError

log = logging.getLogger("lorakit")


@dataclass(frozen=True)
class QuantType:
    """One llama.cpp quantization: its llama_ftype name and the largest relative weight error
    ||dequantized - source|| / ||source|| `export --verify` allows for any tensor. Measured (largest over the
    tensors; a tiny random model with 256-wide rows / SmolLM2-135M, whose 576-wide rows make llama.cpp fall back
    from k-quants to legacy types) in the comments; the limits are ~2x that; a wrong q/k layout gives 1.39."""

    ftype: str
    tolerance: float
    description: str


# The logits of the file's final norm and head vs the source's, on the source's last hidden states, relative to
# max |logit| (export/layerwise_verify.py; llama.cpp keeps the head at q6_k/q8_0). Measured <= 0.019 on tiny
# random models, every type.
LOGIT_TOLERANCE = 0.06

QUANT_TYPES: dict[str, QuantType] = {
    "q4_0": QuantType("LLAMA_FTYPE_MOSTLY_Q4_0", 0.25, "4.5 bits/weight, legacy"),      # 0.086 / 0.104
    "q4_1": QuantType("LLAMA_FTYPE_MOSTLY_Q4_1", 0.20, "5.0 bits/weight, legacy"),      # 0.079 / 0 (already Q4_1)
    "q5_0": QuantType("LLAMA_FTYPE_MOSTLY_Q5_0", 0.12, "5.5 bits/weight, legacy"),      # 0.043 / 0.052
    "q5_1": QuantType("LLAMA_FTYPE_MOSTLY_Q5_1", 0.12, "6.0 bits/weight, legacy"),      # 0.038 / 0.053
    "q4_k_m": QuantType("LLAMA_FTYPE_MOSTLY_Q4_K_M", 0.18, "k-quant mix, ~4.8 bits"),  # 0.072 / 0.052
    "q5_k_m": QuantType("LLAMA_FTYPE_MOSTLY_Q5_K_M", 0.12, "k-quant mix, ~5.7 bits"),  # 0.036 / 0.053
    "q6_k": QuantType("LLAMA_FTYPE_MOSTLY_Q6_K", 0.05, "6.6 bits/weight"),             # 0.018 / 0.018
}


def is_quant_type(name: str) -> bool:
    return name in QUANT_TYPES


def _llama_cpp() -> Any:
    from lorakit.models.llamacpp import llama_cpp_module

    return llama_cpp_module()


def intermediate_dtype(model_dir: Path) -> str:
    """The float GGUF to quantize from: bf16 for a bf16 model (f16 could overflow), else f16."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return "bf16" if dtype == "bfloat16" else "f16"


def read_imatrix(path: Path) -> dict[str, list[float]] | dict[str, Any]:
    """llama.cpp's GGUF imatrix file -> {tensor name: per-column importance (float32 array)}.

    Each tensor `T` is stored as `T.in_sum2` (sum of squared activations per input column, per expert)
    and `T.counts` (tokens seen, per expert); the importance is their ratio (1 where no token was seen),
    as llama-quantize computes it."""
    import numpy as np

    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse error means "not an imatrix GGUF"
        raise ConfigError(f"--imatrix {path}: not a GGUF imatrix file ({e}); the legacy .dat format is not read, "
                          "convert it with llama.cpp's llama-imatrix --output-format gguf") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    out: dict[str, Any] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None or counts.size == 0 or sums.size % counts.size:
            raise ConfigError(f"--imatrix {path}: tensor {base} has no matching .counts")
        per = sums.reshape(counts.size, -1)
        values = np.where(counts[:, None] > 0, per / np.maximum(counts[:, None], 1e-30), 1.0)
        out[base] = values.reshape(-1).astype(np.float32)
    if not out:
        raise ConfigError(f"--imatrix {path}: no '<tensor>.in_sum2' entries: not a GGUF imatrix file")
    return out


def quantize_gguf(src: Path, out: Path, qtype: str, imatrix: Path | None = None, threads: int | None = None) -> None:
    """llama.cpp's quantizer: the float GGUF `src` -> `out` (written in place; the caller renames)."""
    if qtype not in QUANT_TYPES:
        raise ConfigError(f"unknown quantized GGUF type {qtype!r}; choose from {', '.join(QUANT_TYPES)}")
    lc = _llama_cpp()
    from lorakit.machine import usable_cores

    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, QUANT_TYPES[qtype].ftype, None) or _FTYPE_FALLBACK[QUANT_TYPES[qtype].ftype]
    params.nthread = threads or usable_cores()
    keep: list[Any] = []  # the imatrix buffers must outlive the call
    if imatrix is not None:
        data = read_imatrix(imatrix)
        entries = (lc.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, values) in enumerate(data.items()):
            buf = (ctypes.c_float * len(values)).from_buffer_copy(values.tobytes())
            keep += [buf, name.encode()]
            entries[i].name, entries[i].data, entries[i].size = keep[-1], buf, len(values)
        entries[len(data)].name = None  # the list ends at a NULL name
        params.imatrix = entries
        keep.append(entries)
        log.info("quantizing with the importance matrix %s (%d tensors)", imatrix, len(data))
    code = lc.llama_model_quantize(os.fsencode(src), os.fsencode(out), ctypes.byref(params))
    if code != 0:
        raise LorakitError(f"llama.cpp could not quantize {src} to {qtype} (llama_model_quantize returned {code})")


# llama-cpp-python exports only some LLAMA_FTYPE_* names as constants; the enum values (llama.h) are stable.
_FTYPE_FALLBACK = {"LLAMA_FTYPE_MOSTLY_Q4_K_M": 15, "LLAMA_FTYPE_MOSTLY_Q5_K_M": 17, "LLAMA_FTYPE_MOSTLY_Q6_K": 18}


def write_quantized(model_dir: Path, out: Path, qtype: str, imatrix: Path | None = None) -> None:
    """The HF model in `model_dir` -> a float GGUF beside `out` -> llama.cpp's `qtype` at `out`."""
    from lorakit.export.gguf_writer import write_gguf

    float_type = intermediate_dtype(model_dir)
    tmp = out.with_name(f".{out.name}.{float_type}.tmp")
    try:
        write_gguf(model_dir, tmp, float_type)
        quantize_gguf(tmp, out, qtype, imatrix)
    finally:
        tmp.unlink(missing_ok=True)
