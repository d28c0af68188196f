"""Turn a model's reply into candidate tasks, the way real models answer.

Handled: a bare JSON array; an array inside a ```json fence or after some prose; an object wrapping the
array ({"tasks": [...]}); a truncated or partly broken array (each complete item is kept, each broken
one is counted as malformed); and a reply with no JSON at all (`found=False`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_ITEM_BOUNDARY = re.compile(r"\}\s*,\s*")  # end of one object item, start of the next item
# Keys as models sometimes spell them (case-insensitive; Chinese models may answer with Chinese keys).
_KEY_ALIASES = {"instruction": "instruction", "instructions": "instruction", "task": "instruction",
                "指令": "instruction", "input": "input", "inputs": "input", "输入": "input",
                "output": "output", "outputs": "output", "response": "output", "answer": "output",
                "输出": "output", "回答": "output"}
# Placeholders that mean "no input" (Self-Instruct writes <noinput>).
_NO_INPUT = {"", "<noinput>", "<no input>", "noinput", "none", "n/a", "null", "无", "无输入", "<无输入>", "空"}


@dataclass
class ParsedReply:
    """The JSON items found in one model reply, how many could not be decoded, and whether any array was found."""

    items: list[Any] = field(default_factory=list)  # decoded JSON values (objects, normally)
    malformed: int = 0  # items that could not be decoded
    found: bool = False  # whether the reply held a JSON array/object at all


def _as_items(value: Any) -> list[Any] | None:
    """A decoded top-level value -> list of items, or None when it is not task-shaped."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if any(k.lower() in _KEY_ALIASES or k in _KEY_ALIASES for k in value if isinstance(k, str)):
            return [value]
        if len(lists) == 1:
            return lists[0]
    return None


def _salvage_array(text: str, start: int) -> tuple[list[Any], int] | None:
    """Items of the (possibly broken or truncated) array whose '[' is at `start`.

    Each item that decodes is kept; each that does not counts as malformed and scanning resumes at the
    next `},` boundary. Returns None when the text after '[' does not look like a list of objects.
    """
    n = len(text)
    i = start + 1
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i >= n or text[i] != "{":
        return None  # e.g. "[1] see footnote": not an array of task objects
    items: list[Any] = []
    malformed = 0
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            value, end = _DECODER.raw_decode(text, i)
            items.append(value)
            i = end
            continue
        except json.JSONDecodeError:
            pass
        malformed += 1
        m = _ITEM_BOUNDARY.search(text, i + 1)
        if m is None:
            break
        i = m.end()
    return items, malformed


def parse_reply(text: str | None) -> ParsedReply:
    """Find the task array in a reply (see the module docstring for the forms handled)."""
    if not text or not text.strip():
        return ParsedReply()
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for chunk in candidates:  # whole reply or a fenced block that is exactly valid JSON
        try:
            items = _as_items(json.loads(chunk))
        except json.JSONDecodeError:
            continue
        if items is not None:
            return ParsedReply(items=items, found=True)
    best: ParsedReply | None = None
    for chunk in candidates:  # JSON after prose, or a broken/truncated array: salvage item by item
        for m in re.finditer(r"\[", chunk):
            try:  # a complete array (or wrapper object) starting here
                value, _ = _DECODER.raw_decode(chunk, m.start())
                items = _as_items(value)
                if items is not None and any(isinstance(x, dict) for x in items):
                    return ParsedReply(items=items, found=True)
            except json.JSONDecodeError:
                pass
            salvaged = _salvage_array(chunk, m.start())
            if salvaged is not None:
                got = ParsedReply(items=salvaged[0], malformed=salvaged[1], found=True)
                if best is None or len(got.items) > len(best.items):
                    best = got
                break
        if best is not None and best.items:
            return best
    if best is not None:
        return best
    for chunk in candidates:  # a single object, or objects listed without brackets
        objs = [v for v in _iter_objects(chunk) if isinstance(v, dict)]
        if objs:
            return ParsedReply(items=objs, found=True)
    return ParsedReply()


def _iter_objects(text: str) -> list[Any]:
    out = []
    i = text.find("{")
    while i != -1:
        try:
            value, end = _DECODER.raw_decode(text, i)
            out.append(value)
            i = text.find("{", end)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
    return out


def normalize_item(item: Any) -> Any:
    """Map key aliases to instruction/input/output and no-input placeholders to ''.

    Non-objects are returned unchanged (the validator reports them as malformed).
    """
    if not isinstance(item, dict):
        return item
    out: dict[str, Any] = {}
    for key, value in item.items():
        name = _KEY_ALIASES.get(key.strip().lower(), key) if isinstance(key, str) else key
        if name not in out:
            out[name] = value
    value = out.get("input")
    if value is None or (isinstance(value, str) and value.strip().lower() in _NO_INPUT):
        out["input"] = ""
    return out
