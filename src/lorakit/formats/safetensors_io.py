"""Read a sharded safetensors checkpoint lazily: one tensor at a time, or just the headers.

`SafetensorsFolder` hands out tensors by name, each read from its byte range with `os.preadv` into a
tensor of its own (no memory map: a mapped shard's touched pages stay resident until it is unmapped,
so a 6 GB shard read through a map set a merge's peak), so a reader never holds more than the tensor
it asked for. Writing: shard_writer.py.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError, ModelNotFoundError

if TYPE_CHECKING:
    import torch


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# the safetensors format's own dtype names (ints and bool too) <-> torch names; the weight types users
# choose, and their names in every format, are lorakit.precision.WEIGHT_TYPES
_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def torch_dtype(st_dtype: str) -> torch.dtype:
    """A safetensors dtype name ('BF16', 'I64', ...) -> the torch.dtype."""
    import torch

    return getattr(torch, _ST_TO_TORCH[st_dtype])


def st_dtype(dtype: torch.dtype) -> str:
    """A torch.dtype -> its safetensors dtype name."""
    return _TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def pread_fully(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` (bytes) from file `fd` at `offset`, without a memory map and without moving the file
    position; returns the bytes read: len(view), or fewer where the file ends."""
    done = 0
    while done < len(view):  # one read returns at most ~2 GB
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class SafetensorsFolder:
    """The tensors of an HF model folder (`model.safetensors` or an index + shards), opened lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_NAME).is_file():
            weight_map = None  # type: ignore[assignment]
        else:
            found = sorted(p.name for pattern in ("*.bin", "*.pt*") for p in self.folder.glob(pattern))
            hint = f" (found {', '.join(found[:3])}: convert it to safetensors first)" if found else ""
            raise ModelNotFoundError(str(self.folder), [f"{SINGLE_NAME} or {INDEX_NAME} in {self.folder}{hint}"])
        self._info: dict[str, tuple[str, str, list[int]]] = {}  # name -> (file, dtype, shape)
        self._offsets: dict[str, tuple[int, int]] = {}  # name -> (start, end) byte offsets in its file
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
        for fname in files:
            path = self.folder / fname
            if not path.is_file():
                raise ModelNotFoundError(fname, [f"shard {path} listed in {INDEX_NAME}"])
            header, data_start = read_header(path)
            for name, meta in header.items():
                if name != "__metadata__":
                    self._info[name] = (fname, meta["dtype"], list(meta["shape"]))
                    start, end = meta["data_offsets"]
                    self._offsets[name] = (data_start + start, data_start + end)
        self._open_file: str | None = None
        self._handle: Any = None

    @property
    def names(self) -> list[str]:
        """Tensor names grouped by shard (the order that reads each shard once)."""
        return sorted(self._info, key=lambda n: (self._info[n][0], _natural_key(n)))

    def shape(self, name: str) -> list[int]:
        return self._info[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return torch_dtype(self._info[name][1])

    def nbytes(self) -> int:
        return sum(tensor_nbytes(d, s) for _, d, s in self._info.values())

    def location(self, name: str) -> FileRange:
        start, end = self._offsets[name]
        return FileRange(self.folder / self._info[name][0], start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory of its own (keeps only its shard's file open)."""
        import torch

        fname, dtype, shape = self._info[name]
        start, end = self._offsets[name]
        if fname != self._open_file:
            self.close()
            self._handle = open(self.folder / fname, "rb", buffering=0)  # noqa: SIM115 (closed by close())
            self._open_file = fname
        raw = torch.empty(end - start, dtype=torch.uint8)
        if pread_fully(self._handle.fileno(), memoryview(raw.numpy()), start) < end - start:
            raise MismatchError(f"{self.folder / fname}: truncated safetensors file (tensor {name})")
        return raw.view(torch_dtype(dtype)).reshape(shape)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._open_file = None, None


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets), without reading data, and
    the file offset where the data starts (`data_offsets` count from there)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MismatchError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise MismatchError(f"{path}: not a safetensors file (bad header size)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise MismatchError(f"{path}: not a safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise MismatchError(f"{path}: not a safetensors file (bad header)")
        return header, 8 + n


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes of a tensor of safetensors `dtype` and `shape`."""
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
    return size * math.prod(shape)


@dataclass(frozen=True)
class FileRange:
    """Bytes of a tensor inside a file, to be copied verbatim (by the kernel, never through Python)."""

    path: Path
    offset: int
    nbytes: int


def iter_tensors(folder: SafetensorsFolder) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `folder`, one shard mapped at a time."""
    for name in folder.names:
        yield name, folder.get(name)
    folder.close()


def param_count(folder: str | Path) -> int:
    """Parameters of a safetensors model folder, from its headers (no tensor is read)."""
    st = SafetensorsFolder(folder)
    return sum(math.prod(st.shape(name)) for name in st.names)
