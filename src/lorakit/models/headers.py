"""Read the headers of weight files (safetensors, GGUF) without loading a tensor, and refuse damaged ones.

A download cut short, a disk that lost a block or a file of another kind are found here in
milliseconds, before any library maps the file: the header must parse, and every tensor's byte range
(offset + dtype size x shape) must lie inside the file, which must end where the last tensor ends.
The errors name the file, what is wrong and what to do ("truncated: 512 MB of 1.02 GB; download it
again"). Only the header bytes are read; nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import DamagedFileError

REDOWNLOAD = "download it again (or copy it again from where it came from)"
# safetensors' own limit on the header's size: a larger length field means this is not a safetensors file
_MAX_HEADER = 100_000_000
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def human_size(n: int) -> str:
    """Bytes as people read them: 512 bytes, 3.4 kB, 512 MB, 1.02 GB (decimal units, 3 digits)."""
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12)):
        if n < scale * 1000 or unit == "TB":
            value = n / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError


def truncated(path: Path, size: int, expected: int, advice: str = REDOWNLOAD) -> DamagedFileError:
    return DamagedFileError(path, f"truncated: {human_size(size)} of {human_size(expected)}", advice)


def nonempty_size(path: Path, what: str) -> int:
    """Size of `path`; refuses a missing or empty file (`what` says what it should be)."""
    if not path.is_file():
        raise DamagedFileError(path, f"missing ({what})", REDOWNLOAD)
    size = path.stat().st_size
    if size == 0:
        raise DamagedFileError(path, f"empty (0 bytes; should be {what})", REDOWNLOAD)
    return size


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} of a safetensors file whose header and byte ranges check out."""
    size = nonempty_size(path, "a safetensors file")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFileError(path, f"not a safetensors file ({size} bytes, shorter than any header)",
                                   REDOWNLOAD)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n < 2:
            raise DamagedFileError(path, "not a safetensors file (its first 8 bytes are not a header length)",
                                   REDOWNLOAD)
        if 8 + n > size:
            raise truncated(path, size, 8 + n)  # the header alone needs more bytes than there are
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DamagedFileError(path, "corrupt: its header is not valid JSON", REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise DamagedFileError(path, "corrupt: its header is not a JSON object", REDOWNLOAD)
    tensors: dict[str, tuple[str, list[int]]] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = meta["dtype"], list(meta["shape"]), meta["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DamagedFileError(path, f"corrupt: header entry of tensor {name!r} is malformed", REDOWNLOAD) from None
        if dtype in ST_ITEMSIZE and stop - start != ST_ITEMSIZE[dtype] * math.prod(shape):
            raise DamagedFileError(path, f"corrupt: tensor {name!r} ({dtype} {shape}) has {stop - start} bytes "
                                         f"instead of {ST_ITEMSIZE[dtype] * math.prod(shape)}", REDOWNLOAD)
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        raise truncated(path, size, expected)
    if size > expected:
        raise DamagedFileError(path, f"corrupt: {human_size(size - expected)} more than its tensors need "
                                     f"({human_size(size)} instead of {human_size(expected)})", REDOWNLOAD)
    return tensors


# ---- GGUF ------------------------------------------------------------------------------------------
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian GGUF fields from a memory map; running past the end means the file is short."""

    def __init__(self, path: Path, buf: mmap.mmap | bytes):
        self.path, self.buf, self.pos = path, buf, 0

    def need(self, n: int) -> int:
        if self.pos + n > len(self.buf):
            raise _Short(self.pos + n)
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.need(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.scalar("<Q")
        if n > len(self.buf):
            raise DamagedFileError(self.path, "corrupt: a string length in its header is impossible", REDOWNLOAD)
        start = self.need(n)
        return bytes(self.buf[start:start + n])

    def value(self, kind: int, keep: bool = False):
        """The next value of type `kind`: decoded when `keep`, else skipped (None) where only its size
        matters (strings and arrays)."""
        if kind in _SCALAR:
            return self.scalar(_SCALAR[kind])
        if kind == _STRING:
            text = self.string()
            return text.decode("utf-8", "replace") if keep else text
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if keep:
                if count > len(self.buf):
                    raise _Short(self.pos + count)
                return [self.value(item, True) for _ in range(count)]
            if item in _SCALAR:  # skip the items: only their size matters
                self.need(struct.calcsize(_SCALAR[item]) * count)
                return None
            if item == _STRING:  # token lists: ~100k strings in a real model, skipped in a tight loop
                buf, pos, end = self.buf, self.pos, len(self.buf)
                for _ in range(count):
                    if pos + 8 > end:
                        raise _Short(pos + 8)
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                if pos > end:
                    raise _Short(pos)
                self.pos = pos
                return None
            for _ in range(count):
                self.value(item)
            return None
        raise DamagedFileError(self.path, f"corrupt: unknown GGUF value type {kind} in its header", REDOWNLOAD)


class _Short(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def gguf_header(path: Path) -> dict[str, tuple[int, list[int]]]:
    """{tensor name: (ggml type, shape)} of a GGUF whose header, metadata and tensor ranges fit the file."""
    return {name: (t.ggml_type, t.dims) for name, t in gguf_layout(path)[1].items()}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF's table: its GGML type, its dims in GGUF order (columns first) and the
    absolute byte range of its data in the file."""

    ggml_type: int
    dims: list[int]
    start: int
    nbytes: int


# metadata left out of gguf_layout's fields: the vocabulary arrays (~100k strings), walked past
SKIPPED_METADATA = "tokenizer.ggml."


def gguf_layout(path: Path, metadata: bool = False) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    """(metadata, tensors) of a GGUF whose header, metadata and tensor ranges fit the file; `metadata`
    holds every key but the vocabulary arrays when asked for, else only `general.alignment`. Only the
    header's pages are touched, and the file is unmapped before returning."""
    from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

    size = nonempty_size(path, "a GGUF file")
    with path.open("rb") as f:
        if f.read(4) != struct.pack("<I", GGUF_MAGIC):
            raise DamagedFileError(path, "not a GGUF file (it does not start with 'GGUF')", REDOWNLOAD)
        f.seek(0)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(path, buf)
    fields: dict[str, Any] = {}
    try:
        cur.need(4)
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise DamagedFileError(path, f"unsupported GGUF version {version} (2 or 3 expected)", REDOWNLOAD)
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > size or n_kv > size:
            raise DamagedFileError(path, "corrupt: impossible tensor/metadata counts in its header", REDOWNLOAD)
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.string().decode("utf-8", "replace")
            keep = metadata and not key.startswith(SKIPPED_METADATA)
            value = cur.value(cur.scalar("<I"), keep)
            if keep:
                fields[key] = value
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        infos: dict[str, tuple[int, list[int], int]] = {}
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8", "replace")
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos[name] = (ggml_type, dims, offset)
        data_start = -(-cur.pos // alignment) * alignment
    except _Short as e:
        raise truncated(path, size, e.needed) from None
    finally:
        del cur
        buf.close()
    tensors: dict[str, GGUFTensorInfo] = {}
    end = data_start
    for name, (ggml_type, dims, offset) in infos.items():
        if ggml_type not in GGML_QUANT_SIZES:
            raise DamagedFileError(path, f"corrupt: tensor {name!r} has unknown type {ggml_type}", REDOWNLOAD)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        tensors[name] = GGUFTensorInfo(ggml_type, dims, data_start + offset, math.prod(dims) // block * type_size)
        end = max(end, tensors[name].start + tensors[name].nbytes)
    if size < end:
        raise truncated(path, size, end)
    return fields, tensors
