"""An append-only JSONL writer that survives kill -9.

Each record is written as one complete line with a single `write` system call on an unbuffered file,
so a crash leaves at most one partial last line. On open, that partial line is cut off (or completed
with its newline when it is in fact a whole record), every earlier line is validated, and the records
are handed back so the caller can count them and prime its de-duplication. An exclusive `flock`
stops two runs from appending to the same file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from lorakit.data import parse_record
from lorakit.errors import DataError, LorakitError

log = logging.getLogger("lorakit")


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LorakitError(f"{path} is being written by another process") from None


class ResumableJsonlWriter:
    """Open with `open()` (returns the records already in the file), then `append()`, then `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None
        self.repaired_bytes = 0  # size of a partial last line that was cut off on open

    def open(self) -> list[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        _lock(fd, self.path)
        self._fd = fd
        try:
            return self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> list[dict[str, Any]]:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        cut = data.rfind(b"\n") + 1  # end of the last complete line
        tail = data[cut:]
        records: list[dict[str, Any]] = []
        errors: list[DataError] = []
        for number, raw in enumerate(data[:cut].split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            record = self._decode(raw, number, errors)
            if record is not None:
                records.append(record)
        if errors:
            head = "\n".join(str(e) for e in errors[:5])
            more = f"\n... and {len(errors) - 5} more" if len(errors) > 5 else ""
            raise LorakitError(f"{self.path}: the existing output has {len(errors)} invalid line(s); fix or move "
                               f"the file:\n{head}{more}")
        if tail:
            record = self._decode(tail, data[:cut].count(b"\n") + 1, [])
            if record is not None and tail.rstrip().endswith(b"}"):
                os.write(self._fd, b"\n")  # the record was whole; only its newline was lost
                records.append(record)
                log.info("%s: completed the last line (its newline was missing)", self.path)
            else:
                os.ftruncate(self._fd, cut)
                self.repaired_bytes = len(tail)
                log.warning("%s: removed a partial last line (%d bytes) left by an interrupted run",
                            self.path, len(tail))
        return records

    def _decode(self, raw: bytes, number: int, errors: list[DataError]) -> dict[str, Any] | None:
        try:
            obj = json.loads(raw.decode("utf-8"))
            parse_record(obj, self.path, number)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            errors.append(DataError(self.path, number, None, f"not a JSON line ({e})"))
            return None
        except DataError as e:
            errors.append(e)
            return None
        return obj

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, in one system call (no partial record unless killed mid-call)."""
        if self._fd is None:
            raise RuntimeError("writer is not open")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResumableJsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
