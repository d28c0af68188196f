"""Read a sharded safetensors checkpoint lazily and write one tensor at a time.

`SafetensorsFolder` memory-maps one shard at a time (safetensors.safe_open) and hands out tensors by
name, so a reader never holds more than the tensor it asked for. `StreamingShardWriter` writes a
sharded checkpoint in the safetensors format whose layout (names, dtypes, shapes, offsets) is planned up
front: each shard's header is written first, then every tensor's bytes as they arrive. Peak memory is one
tensor, not one shard (safetensors' `save_file` needs the whole shard in memory). The files are read
back by the safetensors library itself in the tests.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lorakit.errors import ConfigError, MismatchError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lorakit")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype names <-> torch dtype names
_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, _ST_TO_TORCH[st_dtype])


def st_dtype(dtype: torch.dtype) -> str:
    return _TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 1000 -> bytes (decimal units like transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ConfigError(f"--max-shard-size: {text!r} is not a size like 2GB or 500MB")
    return int(value * units[unit])


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
        return sum(_nbytes(d, s) for _, d, s in self._info.values())

    def location(self, name: str) -> FileRange:
        start, end = self._offsets[name]
        return FileRange(self.folder / self._info[name][0], start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (keeps only its shard mapped; switching shards unmaps the previous one)."""
        from safetensors import safe_open

        fname = self._info[name][0]
        if fname != self._open_file:
            self.close()
            self._handle = safe_open(str(self.folder / fname), framework="pt")
            self._open_file = fname
        return self._handle.get_tensor(name)

    def close(self) -> None:
        # Dropping the last reference unmaps the file (safe_open has no explicit close).
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


def _nbytes(dtype: str, shape: list[int]) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
    return size * math.prod(shape)


@dataclass
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class FileRange:
    """Bytes of a tensor inside a file, to be copied verbatim (by the kernel, never through Python)."""

    path: Path
    offset: int
    nbytes: int


class BufferPool:
    """A few output buffers handed out in turn: `acquire` blocks until the writer has `release`d one.

    Reused buffers keep their pages: on this kind of VM a fresh 20-50 MB allocation per tensor costs
    more in page faults than the merge arithmetic itself."""

    def __init__(self, count: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # allocated on first use, at the size then needed
        self._owner: dict[int, Any] = {}  # id(handed-out view) -> its buffer

    def acquire(self, t: PlannedTensor) -> torch.Tensor:
        import torch

        buf = self._free.get()
        if buf is None or buf.numel() < t.nbytes:
            buf = torch.empty(t.nbytes, dtype=torch.uint8)
        view = buf[: t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
        self._owner[id(view)] = buf
        return view

    def release(self, payload: Any) -> None:
        buf = self._owner.pop(id(payload), None)
        if buf is not None:
            self._free.put(buf)


class StreamingShardWriter:
    """Write planned tensors, in plan order, into size-limited safetensors shards + an index.

    Usage: `w = StreamingShardWriter(folder, plan, max_shard_bytes)`, then `w.write(name, tensor)` for
    each planned tensor in order, then `w.finish()`.
    """

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_bytes: int):
        self.folder = folder
        self.shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            if self.shards[-1] and size + t.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += t.nbytes
        n = len(self.shards)
        self.file_names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._file_index = -1

    def _start_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[i]:
            header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
        # unbuffered: file ranges are copied by the kernel at the descriptor's position
        self._file = open(self.folder / self.file_names[i], "wb", buffering=0)  # noqa: SIM115 (closed in _start_shard/finish)
        _write_fully(self._file, memoryview(struct.pack("<Q", len(blob)) + blob))
        self._file_index = i

    def write(self, name: str, tensor: torch.Tensor | FileRange) -> None:
        """Write the next planned tensor: a tensor's bytes, or a `FileRange` of the same size and dtype
        (copied by the kernel)."""
        i, t = self._order[self._pos]
        if isinstance(tensor, FileRange):
            if name != t.name or tensor.nbytes != t.nbytes:
                raise RuntimeError(f"writer expected {t.name} ({t.nbytes} bytes), got {name} ({tensor.nbytes} bytes)")
        elif name != t.name or list(tensor.shape) != t.shape or st_dtype(tensor.dtype) != t.dtype:
            raise RuntimeError(f"writer expected {t.name} {t.dtype}{t.shape}, got {name} "
                               f"{st_dtype(tensor.dtype)}{list(tensor.shape)}")
        if i != self._file_index:
            self._start_shard(i)
        assert self._file is not None
        if isinstance(tensor, FileRange):
            _copy_range(tensor, self._file)
        else:
            import torch

            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # little-endian on x86/ARM
            _write_fully(self._file, memoryview(flat.numpy()))
        self._pos += 1

    def write_all(self, items: Iterable[tuple[str, torch.Tensor | FileRange]], depth: int = 2,
                  on_written: Callable[[Any], None] | None = None) -> list[str]:
        """Write every planned tensor from `items` and finish. Writing runs in a second thread, so the
        disk works while the next tensor is computed (both release the GIL); at most `depth` tensors
        wait in between. `on_written(payload)` is called once each payload is on disk (to reuse it)."""
        todo: queue.Queue = queue.Queue(maxsize=depth)
        errors: list[BaseException] = []

        def consume() -> None:
            while (item := todo.get()) is not None:
                if not errors:  # after an error keep draining so the producer never blocks
                    try:
                        self.write(*item)
                    except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                        errors.append(e)
                if on_written is not None:
                    on_written(item[1])  # also after an error: a producer may be waiting for the buffer

        worker = threading.Thread(target=consume, name="lorakit-writer", daemon=True)
        worker.start()
        try:
            for item in items:
                if errors:
                    break
                todo.put(item)
        finally:
            todo.put(None)
            worker.join()
        if errors:
            raise errors[0]
        return self.finish()

    def finish(self) -> list[str]:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} tensors")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.file_names) > 1:
            weight_map = {t.name: self.file_names[i] for i, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            (self.folder / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return self.file_names

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# Bytes per write() call. Measured on this VM (ext4, 2.1 GB): 64 MB writes 4.8-5.2 s, 1 MB 0.6 s,
# 128 KB 0.5 s, `cp` 0.6-0.8 s; large single writes are many times slower than modest ones.
_WRITE_CHUNK = 1 << 20


def _write_fully(dest: BinaryIO, view: memoryview) -> None:
    view = view.cast("B")
    while view:  # an unbuffered file may write less than asked
        view = view[dest.write(view[:_WRITE_CHUNK]):]


def _copy_range(source: FileRange, dest: BinaryIO) -> None:
    """Append `source`'s bytes to `dest` with copy_file_range (no user-space copy; falls back to
    read/write where the kernel or file system refuses)."""
    import os

    with open(source.path, "rb", buffering=0) as src:
        offset, left = source.offset, source.nbytes
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dest.fileno(), left, offset)
                if n == 0:  # end of file, or a file system that copies nothing: read/write decides which
                    raise OSError("copy_file_range copied nothing")
                offset, left = offset + n, left - n
        except (AttributeError, OSError):  # no copy_file_range (old kernel, other OS, cross-device)
            src.seek(offset)
            while left:
                chunk = src.read(min(left, 64 << 20))
                if not chunk:
                    raise MismatchError(f"{source.path}: ends before byte {offset} (truncated file?)") from None
                _write_fully(dest, memoryview(chunk))
                offset, left = offset + len(chunk), left - len(chunk)


def iter_tensors(folder: SafetensorsFolder) -> Iterator[tuple[str, torch.Tensor]]:
    for name in folder.names:
        yield name, folder.get(name)
    folder.close()


def param_count(folder: str | Path) -> int:
    """Parameters of a safetensors model folder, from its headers (no tensor is read)."""
    st = SafetensorsFolder(folder)
    return sum(math.prod(st.shape(name)) for name in st.names)
