"""The header of a GGUF file (metadata and tensor table), read sequentially without mapping the file.

gguf-py's GGUFReader maps the whole file and builds a numpy view for every item of every array: for a
32k-token vocabulary that took 13 s (on a loaded 2-core machine) before a single weight was read. This
reads the same layout (GGUF v2/v3, little-endian, as llama.cpp's gguf.cpp and gguf-py define it) with
`struct` from a buffered file: the tokenizer arrays are walked past, not kept. gguf-py still supplies the
type tables (value types, GGML types and their block sizes). Tested against GGUFReader
(tests/test_gguf_weights.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lorakit.errors import DamagedFileError

SKIPPED_PREFIX = "tokenizer.ggml."  # vocabulary arrays: walked past, not returned
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in the file: its GGML type, HF-order shape (rows first) and byte range."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as V

    return {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


class _Cursor:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path
        self.formats = _scalar_formats()

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise DamagedFileError(self.path, "GGUF header truncated", "write the file again")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool) -> Any:
        from gguf import GGUFValueType as V

        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            item_type, n = self.unpack("<I"), self.unpack("<Q")
            if item_type in self.formats and not keep:  # fixed-size items: skip them in one seek
                self.f.seek(n * struct.calcsize(self.formats[item_type]), 1)
                return None
            items = [self.value(item_type, keep) for _ in range(n)]
            return items if keep else None
        if vtype not in self.formats:
            raise DamagedFileError(self.path, f"unknown GGUF value type {vtype}")
        return self.unpack(self.formats[vtype])


def read_layout(path: Path) -> tuple[dict[str, Any], dict[str, StoredTensor]]:
    """(metadata key -> value, tokenizer arrays left out; GGUF name -> StoredTensor) of a GGUF file, from
    its header only."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb", buffering=1 << 20) as f:
        c = _Cursor(f, path)
        if c.take(4) != b"GGUF":
            raise DamagedFileError(path, "not a GGUF file (no GGUF magic)")
        version = c.unpack("<I")
        if version not in (2, 3):
            raise DamagedFileError(path, f"GGUF version {version} is not read (2 and 3 are)")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            keep = not key.startswith(SKIPPED_PREFIX)
            value = c.value(c.unpack("<I"), keep)
            if keep:
                fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
            try:
                qtype = GGMLQuantizationType(c.unpack("<I"))
            except ValueError:
                raise DamagedFileError(path, f"tensor {name} has an unknown GGML type") from None
            infos.append((name, qtype, dims, c.unpack("<Q")))
        alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-f.tell() // alignment) * alignment
    tensors: dict[str, StoredTensor] = {}
    for name, qtype, dims, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in dims:
            n *= d
        stored = StoredTensor(name, qtype, tuple(reversed(dims)), data_start + offset, n * type_size // block)
        if stored.offset + stored.nbytes > size:
            raise DamagedFileError(path, f"tensor {name} lies past the end of the file (truncated)",
                                   "write the file again")
        tensors[name] = stored
    return fields, tensors
