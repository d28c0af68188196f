"""GGUF files made once and kept in lorakit's cache (next to the GGUF -> HF conversions, see models/resolve.py).

The llama.cpp back-end and `export --format gguf-lora --verify` need a base model and adapters as GGUF.
Each file is keyed by its inputs: size and modification time of every file in the source folder(s),
plus the weight type and lorakit's writer version, so editing or retraining anything makes a new entry.
Files are written to a temporary name and renamed, so a crash never leaves a half file in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from lorakit.models.resolve import cache_root

log = logging.getLogger("lorakit")
WRITER_VERSION = "1"  # bump when the GGUF written for the same inputs changes


def _fingerprint(*folders: Path, extra: str = "") -> str:
    h = hashlib.sha256(f"{WRITER_VERSION}|{extra}".encode())
    for folder in folders:
        for p in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _place(target: Path, write) -> Path:
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def cached_model_gguf(model_dir: Path, gguf_type: str) -> Path:
    """The HF model in `model_dir` as a GGUF of `gguf_type` (f32/f16/bf16/q8_0 or a quantized type)."""
    from lorakit.export.quantize import is_quant_type

    key = _fingerprint(model_dir, extra=gguf_type)
    target = cache_root() / "llamacpp" / f"{model_dir.name}-{gguf_type}-{key}.gguf"
    if target.is_file():
        return target
    log.info("writing %s as a %s GGUF for llama.cpp (once; cached in %s)", model_dir.name, gguf_type, target.parent)

    def write(tmp: Path) -> None:
        if is_quant_type(gguf_type):
            from lorakit.export.quantize import write_quantized

            write_quantized(model_dir, tmp, gguf_type)
        else:
            from lorakit.export.gguf_writer import write_gguf

            write_gguf(model_dir, tmp, gguf_type)

    return _place(target, write)


def cached_adapter_gguf(adapter_dir: Path, base_dir: Path, gguf_type: str = "f32") -> Path:
    """The PEFT adapter in `adapter_dir` (for the HF base `base_dir`) as a GGUF LoRA."""
    from lorakit.export.gguf_lora import write_gguf_lora

    key = _fingerprint(adapter_dir, base_dir / "config.json", extra=gguf_type)
    target = cache_root() / "llamacpp" / f"{adapter_dir.name}-lora-{gguf_type}-{key}.gguf"
    return _place(target, lambda tmp: write_gguf_lora(adapter_dir, base_dir, tmp, gguf_type))
