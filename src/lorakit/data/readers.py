"""Readers for instruction data (alpaca, chat `messages`, sharegpt `conversations`) and raw text.

Every record is validated before any training starts. A problem is reported as a `DataError`
naming `file:line` and the field; the caller either stops (default) or skips bad records.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import DataError, DataErrors
from lorakit.prompts import alpaca_to_messages

Message = dict[str, str]
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
_CHAT_ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    """One training example. `messages` is always set; alpaca records also keep their three fields."""

    messages: list[Message]
    where: str = ""
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_alpaca(self) -> bool:
        return self.instruction is not None


def _need_str(obj: dict, key: str, path: str | Path, line: int, allow_empty: bool = False,
              prefix: str = "") -> str:
    if key not in obj:
        raise DataError(path, line, prefix + key, "missing")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, line, prefix + key, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, line, prefix + key, "must not be empty")
    return value


def parse_record(obj: Any, path: str | Path = "<record>", line: int = 0) -> Example:
    """Validate one decoded JSON record and normalize it to an `Example` (raises `DataError`)."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj or "conversations" in obj:
        key = "messages" if "messages" in obj else "conversations"
        turns = obj[key]
        if not isinstance(turns, list) or not turns:
            raise DataError(path, line, key, "must be a non-empty list of turns")
        role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
        messages = []
        for i, turn in enumerate(turns):
            name = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(path, line, name, "a turn must be an object")
            role = _need_str(turn, role_key, path, line, prefix=f"{name}.")
            role = role if key == "messages" else _SHAREGPT_ROLES.get(role.lower(), "")
            if role not in _CHAT_ROLES:
                raise DataError(path, line, f"{name}.{role_key}",
                                f"unknown role {turn[role_key]!r} (expected one of "
                                f"{sorted(_CHAT_ROLES) if key == 'messages' else sorted(_SHAREGPT_ROLES)})")
            content = _need_str(turn, text_key, path, line, allow_empty=role != "assistant", prefix=f"{name}.")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(path, line, key, "has no assistant turn to learn from")
        extra = {k: v for k, v in obj.items() if k != key}
        return Example(messages=messages, where=where, extra=extra)
    if "instruction" in obj or "output" in obj:
        instruction = _need_str(obj, "instruction", path, line)
        raw_input = obj.get("input")
        if raw_input is not None and not isinstance(raw_input, str):
            raise DataError(path, line, "input", f"must be a string, got {type(raw_input).__name__}")
        output = _need_str(obj, "output", path, line)
        extra = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
        return Example(messages=alpaca_to_messages(instruction, raw_input, output), where=where,
                       instruction=instruction, input=raw_input or "", output=output, extra=extra)
    raise DataError(path, line, None, "unknown record format: expected 'instruction'/'input'/'output', "
                    "'messages' (role/content) or 'conversations' (from/value)")


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, line, None, f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None


def _iter_jsonl(path: Path, data: bytes) -> Iterator[tuple[int, Any] | DataError]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = _decode(raw, path)
            yield number, json.loads(text)
        except DataError as e:
            yield DataError(path, number, None, e.reason)
        except json.JSONDecodeError as e:
            yield DataError(path, number, None, f"malformed JSON: {e.msg} (column {e.colno})")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, element) for each element of a top-level JSON array, with its starting line."""
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    line_of = lambda pos: bisect.bisect_right(starts, pos)  # noqa: E731
    decoder = json.JSONDecoder()

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(text.index("[") + 1)
    while i < len(text) and text[i] != "]":
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
        yield line_of(i), obj
        i = skip_ws(end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
        elif i >= len(text) or text[i] != "]":
            raise DataError(path, line_of(min(i, len(text) - 1)), None, "malformed JSON: expected ',' or ']'")


def iter_records(path: str | Path) -> Iterator[tuple[int, Any] | DataError]:
    """Yield (line, decoded JSON) per record of a .json array or .jsonl file, or a DataError per bad line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "no such data file")
    data = p.read_bytes()
    if data.lstrip()[:1] == b"[":
        yield from _iter_json_array(p, _decode(data, p))
    else:
        yield from _iter_jsonl(p, data)


DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def data_files(path: str | Path) -> list[Path]:
    """The instruction data files `read_examples` reads: the file, or a folder's .json/.jsonl/.parquet, sorted."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(p, None, None, "folder holds no .json, .jsonl or .parquet files")
        return files
    return [p]


def iter_examples(file: Path) -> Iterator[Example | DataError]:
    """Each record of one data file as an Example, or a DataError for a bad one (`file:line`; parquet:
    `file row n`). A file that cannot be read on yields its DataError last."""
    try:
        if file.suffix == ".parquet":
            from lorakit.data.parquet import iter_rows

            if not file.is_file():
                raise DataError(file, None, None, "no such data file")
            for row, obj in iter_rows(file):
                where = f"{file} row {row}"
                try:
                    example = parse_record(obj, file, row)
                except DataError as e:
                    yield DataError(where, None, e.field, e.reason)
                    continue
                example.where = where
                yield example
            return
        for item in iter_records(file):
            if isinstance(item, DataError):
                yield item
                continue
            try:
                yield parse_record(item[1], file, item[0])
            except DataError as e:
                yield e
    except DataError as e:  # the file itself is unreadable: nothing after it can be trusted
        yield e


def read_examples(path: str | Path, skip_invalid: bool = False) -> tuple[list[Example], list[DataError]]:
    """Read every record of a file (or of every .json/.jsonl/.parquet file in a folder).

    Returns (examples, skipped errors). Without `skip_invalid`, any invalid record raises
    `DataErrors` listing them all, so the user fixes the file in one pass.
    """
    examples: list[Example] = []
    errors: list[DataError] = []
    for file in data_files(path):
        for item in iter_examples(file):
            (errors if isinstance(item, DataError) else examples).append(item)
    if errors and not skip_invalid:
        raise DataErrors(errors)
    if not examples:
        raise DataError(path, None, None, "no valid records")
    return examples, errors


def read_text_documents(path: str | Path) -> list[str]:
    """Raw text for pre-training: `.txt` (one document per non-empty line) or `.jsonl` with `text`."""
    docs: list[str] = []
    paths = sorted(q for q in Path(path).iterdir() if q.suffix in (".txt", ".jsonl", ".json")) \
        if Path(path).is_dir() else [Path(path)]
    errors: list[DataError] = []
    for p in paths:
        if not p.is_file():
            raise DataError(p, None, None, "no such data file")
        if p.suffix == ".txt":
            text = _decode(p.read_bytes(), p)
            docs.extend(line for line in text.splitlines() if line.strip())
            continue
        for item in iter_records(p):
            if isinstance(item, DataError):
                errors.append(item)
            elif not isinstance(item[1], dict) or not isinstance(item[1].get("text"), str):
                errors.append(DataError(p, item[0], "text", "missing or not a string"))
            elif item[1]["text"].strip():
                docs.append(item[1]["text"])
    if errors:
        raise DataErrors(errors)
    return docs
