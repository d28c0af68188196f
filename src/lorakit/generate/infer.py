"""`lorakit infer`: generate a response for every record of a data file, in order, resumably.

Output: one JSON line per input record (its fields kept, plus "response"), appended batch by batch and
flushed, so an interrupted run resumes where it stopped: records already in the output are skipped
(after checking they belong to this input), and a torn last line is cut off.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lorakit.data.readers import iter_records, parse_record
from lorakit.errors import DataError, LorakitError
from lorakit.generate.config import InferConfig
from lorakit.generate.params import sampling_params

log = logging.getLogger("lorakit")


def prompt_source(obj: Any, path: Path, line: int) -> dict[str, Any]:
    """What to prompt with: {"instruction", "input"} or {"messages"} (a trailing assistant turn, the
    reference answer, is left out). Validated through the data readers; raises DataError."""
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"a record must be a JSON object, got {type(obj).__name__}")
    probe = dict(obj)
    if "messages" in probe and isinstance(probe["messages"], list):
        probe["messages"] = [*probe["messages"], {"role": "assistant", "content": "-"}]
    elif "conversations" in probe and isinstance(probe["conversations"], list):
        probe["conversations"] = [*probe["conversations"], {"from": "gpt", "value": "-"}]
    elif "instruction" in probe:
        probe["output"] = "-"  # the answer is what we generate; only instruction/input are checked
    example = parse_record(probe, path, line)
    if example.is_alpaca:
        return {"instruction": example.instruction, "input": example.input}
    messages = list(example.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise DataError(path, line, "messages", "needs a user turn to respond to")
    return {"messages": messages}


def read_inputs(path: Path, limit: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """[(record, prompt source)] for every record, all validated before any model is loaded."""
    items, errors = [], []
    for item in iter_records(path):
        if isinstance(item, DataError):
            errors.append(item)
            continue
        line, obj = item
        try:
            items.append((obj, prompt_source(obj, path, line)))
        except DataError as e:
            errors.append(e)
        if limit and len(items) >= limit:
            break
    if errors:
        shown = "\n".join(str(e) for e in errors[:10])
        more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise LorakitError(f"{len(errors)} invalid record(s) (each needs a response, so none is skipped):\n"
                           f"{shown}{more}")
    if not items:
        raise DataError(path, None, None, "no records")
    return items


def done_records(output: Path, inputs: list[dict[str, Any]]) -> int:
    """How many records `output` already holds; checks they match `inputs` and cuts a torn last line."""
    if not output.is_file():
        return 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
    if keep < len(data):
        log.warning("%s: dropping an incomplete last line (interrupted write)", output)
        with output.open("r+b") as f:
            f.truncate(keep)
    lines = [x for x in data[:keep].decode("utf-8").split("\n") if x.strip()]
    for n, text in enumerate(lines):
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(output, n + 1, None, f"malformed JSON in existing output: {e.msg}") from None
        if n >= len(inputs) or not isinstance(rec, dict) or "response" not in rec or \
                _without_response(rec) != _without_response(inputs[n]):
            raise LorakitError(f"{output}:{n + 1}: this output does not belong to the input file (record {n + 1} "
                               "differs); choose another --output or delete it to start over")
    return len(lines)


def _without_response(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "response"}


def run_infer(cfg: InferConfig) -> int:
    """The `lorakit infer` verb: a JSON/JSONL file of records -> a JSONL file of answers; returns the exit code."""
    from tqdm.auto import tqdm

    items = read_inputs(Path(cfg.data_file), cfg.limit)
    output = Path(cfg.output)
    done = done_records(output, [rec for rec, _ in items])
    if done >= len(items):
        print(f"{output}: all {len(items)} records already done")
        return 0
    if done:
        print(f"resuming: {done} of {len(items)} records already in {output}")
    from lorakit.generate.backends import load_engine

    engine = load_engine(cfg)
    todo = items[done:]
    prompts = [engine.chat_ids(src["messages"]) if "messages" in src
               else engine.instruction_ids(src["instruction"], src["input"]) for _, src in todo]
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with output.open("a", encoding="utf-8") as f, tqdm(total=len(items), initial=done, desc="infer",
                                                       unit="rec") as bar:
        for batch in engine.generate_many(prompts, sampling_params(cfg), cfg.batch_size):
            for req in batch:
                record = dict(todo[written][0])
                record["response"] = req.text.strip()
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    print(f"wrote {written} responses to {output} ({done + written} records in total)")
    return 0
