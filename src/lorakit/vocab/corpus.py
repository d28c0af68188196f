"""Plain text lines from the data files lorakit knows, for tokenizer training and statistics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lorakit.data.readers import iter_records, parse_record
from lorakit.errors import DataError


def _record_texts(obj: object, path: Path, line: int) -> list[str]:
    """The text fields of one JSON record: `text`, or every alpaca field / chat message."""
    if isinstance(obj, dict) and "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(path, line, "text", "must be a string")
        return [obj["text"]]
    example = parse_record(obj, path, line)  # raises DataError naming file:line and field
    if example.is_alpaca:
        return [t for t in (example.instruction, example.input, example.output) if t]
    return [m["content"] for m in example.messages if m["content"]]


def iter_text_lines(path: str | Path, max_records: int = 0) -> Iterator[str]:
    """Yield the non-empty lines of a text file (.txt), or of the text fields of a .json/.jsonl file.

    `max_records` (0: no limit) caps the lines of a .txt file or the records of a JSON file.
    Raises DataError (file:line) on a missing file, bad UTF-8 or an unusable record.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "no such text file")
    if p.suffix in (".json", ".jsonl"):
        for count, item in enumerate(iter_records(p), start=1):
            if isinstance(item, DataError):
                raise item
            for text in _record_texts(item[1], p, item[0]):
                yield from (ln for ln in text.splitlines() if ln.strip())
            if max_records and count >= max_records:
                return
        return
    count = 0
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(p, number, None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x})") from None
            if line.strip():
                yield line
                count += 1
                if max_records and count >= max_records:
                    return


def read_text_lines(paths: list[str], max_records: int = 0) -> list[str]:
    """The text lines of every file in `paths` (at most `max_records` per file when > 0)."""
    return [line for p in paths for line in iter_text_lines(p, max_records)]
