"""`StreamingShardWriter`: a sharded safetensors checkpoint written one tensor at a time.

The layout (names, dtypes, shapes, offsets) is planned up front (`PlannedTensor`): each shard's header
is written first, then every tensor's bytes as they arrive, or copied verbatim from a source file
(`FileRange`). Peak memory is one tensor, not one shard (why not safetensors' `save_file`:
docs/design.md#a-hand-written-safetensors-writer). The files are read back by the safetensors
library itself in the tests.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lorakit.errors import ConfigError, MismatchError
from lorakit.formats.safetensors_io import INDEX_NAME, SINGLE_NAME, FileRange, st_dtype, tensor_nbytes, torch_dtype

if TYPE_CHECKING:
    import torch



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


@dataclass
class PlannedTensor:
    """One tensor of the output layout: name, safetensors dtype and shape."""

    name: str
    dtype: str  # safetensors dtype name
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


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


# Bytes per write() call: large single writes are many times slower than modest ones
# (docs/performance.md#streaming-merge-memory-and-time).
_WRITE_CHUNK = 1 << 20


def _write_fully(dest: BinaryIO, view: memoryview) -> None:
    view = view.cast("B")
    while view:  # an unbuffered file may write less than asked
        view = view[dest.write(view[:_WRITE_CHUNK]):]


def _copy_range(source: FileRange, dest: BinaryIO) -> None:
    """Append `source`'s bytes to `dest` with copy_file_range (no user-space copy; falls back to
    read/write where the kernel or file system refuses)."""

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
