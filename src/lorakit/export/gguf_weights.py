"""A GGUF file lorakit wrote, read back one tensor at a time under Hugging Face names, in HF layout.

The `WeightSource` of `export --verify` (checkpoint/layerwise.py) for every GGUF type lorakit writes:
f32/f16/bf16/q8_0 (export/gguf_writer.py) and llama.cpp's quantizations of them (export/quantize.py).
The header (names, types, shapes, byte offsets) is read once by the damaged-file check's reader
(models/headers.py, which touches only the header's pages), and each tensor is read with os.preadv
straight into its own buffer, so only the tensor asked for is ever resident (a mapped file's touched
pages would count as resident memory: a 7B file is 4-13 GB). Block-quantized tensors are dequantized
by gguf-py (independently of llama.cpp) in chunks of rows.

What the writer did, undone here with code of its own: GGUF names -> HF names (the family registry's
rules), llama.cpp's interleaved q/k rows -> HF's half-split order (LLaMA/Mistral:
`checkpoint.weight_sources.interleaved_to_half_rows`), Gemma's `1 + w` norms -> `w`. `rope_freqs`
(Llama 3's RoPE scaling) is not an HF parameter: `check_rope_freqs` compares it with the config's.
A tied head has no `output.weight`: `lm_head.weight` is then not listed, and `get` returns the
embeddings for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.checkpoint.weight_sources import config_dict, interleaved_to_half_rows
from lorakit.errors import DamagedFileError, MismatchError
from lorakit.formats.safetensors_io import pread_fully
from lorakit.models.families import Family, family_of_config
from lorakit.models.headers import gguf_layout
from lorakit.models.layout import TensorRule, rotary_heads

if TYPE_CHECKING:
    import numpy as np
    import torch

ROPE_FREQS = "rope_freqs.weight"
# Rows dequantized per step: bounds the float32 temporaries of gguf-py's dequantizer (~several x the output).
CHUNK_ELEMENTS = 4 << 20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in the file: its GGML type, HF-order shape (rows first) and byte range."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_layout(path: Path) -> tuple[dict[str, Any], dict[str, StoredTensor]]:
    """(metadata but the vocabulary arrays; GGUF name -> StoredTensor) from a GGUF's header."""
    from gguf import GGMLQuantizationType

    fields, infos = gguf_layout(Path(path), metadata=True)
    return fields, {name: StoredTensor(name, GGMLQuantizationType(t.ggml_type), tuple(reversed(t.dims)), t.start,
                                       t.nbytes) for name, t in infos.items()}


def _pread_into(fd: int, buf: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(buf).cast("B")
    done = pread_fully(fd, view, offset)
    if done < len(view):
        raise DamagedFileError(path, f"truncated: {len(view) - done} bytes missing at offset {offset + done}")


class GGUFWeights:
    """The HF-named tensors of a GGUF written from a model with HF config `config` (dict or
    PretrainedConfig), one at a time (see the module doc)."""

    def __init__(self, path: str | Path, config: Any, family: Family | None = None):
        self.path = Path(path)
        self.config = config_dict(config)
        self.family = family or family_of_config(self.config, str(self.path))
        self.fields, self.tensors = read_layout(self.path)
        self.arch = str(self.fields.get("general.architecture", ""))
        if self.arch != self.family.gguf_arch:
            raise MismatchError(f"{self.path}: general.architecture is {self.arch!r}, a {self.family.name} model "
                                f"is written as {self.family.gguf_arch!r}")
        patterns = [(re.compile(re.escape(r.gguf).replace(r"\{\}", r"(\d+)")), r) for r in self.family.rules]
        self._by_hf: dict[str, tuple[StoredTensor, TensorRule]] = {}
        self.unknown: list[str] = []  # GGUF tensors no HF parameter maps to (besides rope_freqs)
        for name, stored in self.tensors.items():
            found = next(((m, r) for p, r in patterns if (m := p.fullmatch(name))), None)
            if found is None:
                if name != ROPE_FREQS:
                    self.unknown.append(name)
                continue
            m, rule = found
            self._by_hf[rule.hf.format(*m.groups())] = (stored, rule)

    def names(self) -> Iterator[str]:
        return iter(self._by_hf)

    def __contains__(self, name: str) -> bool:
        return name in self._by_hf

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` in HF layout: float32 for F32 and block-quantized types, float16/bfloat16 as stored."""
        if name not in self._by_hf and name == "lm_head.weight" and "model.embed_tokens.weight" in self._by_hf:
            name = "model.embed_tokens.weight"  # tied head: llama.cpp reuses token_embd
        if name not in self._by_hf:
            raise KeyError(f"{self.path}: no GGUF tensor for {name}")
        stored, rule = self._by_hf[name]
        w = self.read_stored(stored)
        if self.family.permute_qk:
            heads = rotary_heads(rule, self.config)
            if heads:
                w = interleaved_to_half_rows(w, heads)
        if self.family.gguf_norm_shift and name.endswith("norm.weight"):
            w = w.float() - self.family.gguf_norm_shift
        return w

    def read_stored(self, stored: StoredTensor) -> torch.Tensor:
        """One tensor's values as stored (GGUF layout, HF-order shape), read from the file now."""
        import numpy as np
        import torch
        from gguf import GGML_QUANT_SIZES
        from gguf import GGMLQuantizationType as Q

        plain = {Q.F32: (np.float32, None), Q.F16: (np.float16, None), Q.BF16: (np.uint16, torch.bfloat16)}
        with open(self.path, "rb") as f:
            fd = f.fileno()
            if stored.qtype in plain:
                np_type, view_as = plain[stored.qtype]
                buf = np.empty(stored.shape, dtype=np_type)
                _pread_into(fd, buf, stored.offset, self.path)
                t = torch.from_numpy(buf)
                return t.view(view_as) if view_as is not None else t
            block, type_size = GGML_QUANT_SIZES[stored.qtype]
            cols = stored.shape[-1]
            if cols % block:
                raise DamagedFileError(self.path, f"{stored.name}: rows of {cols} are not whole {block}-blocks")
            row_bytes = cols // block * type_size
            rows = stored.nbytes // row_bytes
            out = torch.empty((rows, cols), dtype=torch.float32)
            step = max(1, CHUNK_ELEMENTS // cols)
            for start in range(0, rows, step):
                n = min(step, rows - start)
                raw = np.empty((n, row_bytes), dtype=np.uint8)
                _pread_into(fd, raw, stored.offset + start * row_bytes, self.path)
                out[start:start + n] = torch.from_numpy(_dequantize(raw, stored.qtype).reshape(n, cols))
            return out.reshape(stored.shape)

    def check_rope_freqs(self, expected: list[float] | None) -> str | None:
        """None if the file's `rope_freqs` matches `expected` (export/gguf_metadata.rope_factors of the
        config; None: the file must have none), else what differs."""
        has = ROPE_FREQS in self.tensors
        if expected is None:
            return f"{ROPE_FREQS} present, the model has no RoPE scaling" if has else None
        if not has:
            return f"{ROPE_FREQS} missing (the model has Llama 3 RoPE scaling)"
        got = self.read_stored(self.tensors[ROPE_FREQS]).float().reshape(-1)
        import torch

        want = torch.tensor(expected, dtype=torch.float32)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=0):
            return f"{ROPE_FREQS} differs from the config's RoPE scaling"
        return None


def _dequantize(raw: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(raw, qtype)
