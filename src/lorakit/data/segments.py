"""Pre-training text tokenized in parallel, straight from the files, into flat token files.

The corpus is cut into byte ranges ("segments") at line ends; each worker process reads its own range,
finds the documents in it exactly as `read_text_documents` does (.txt: one per non-empty line; .jsonl:
the `text` of each record; a .json array is one segment), tokenizes them (BOS as the tokenizer adds it,
then EOS) and writes the ids to its own file. Nothing but a few numbers crosses between processes, and
no process ever holds more than one segment's text (<= 4 MB) and one batch's tokens: memory does not grow
with the corpus.
Bad records are reported as today (file and line), with line numbers counted across segments.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.data.readers import _decode, _iter_jsonl, iter_records
from lorakit.errors import DataError

MAX_SEGMENT_BYTES = 4 * 2**20
MIN_SEGMENT_BYTES = 4096
BATCH_CHARS = 2**16  # text per tokenizer call: the ids come back as Python lists (~36 bytes a token)
_tokenizer: Any = None  # the workers' tokenizer (inherited through fork, or set by _init_worker)


@dataclass
class Segment:
    index: int
    path: Path
    start: int
    end: int  # byte range [start, end), ending after a newline (or at the end of the file)
    whole_json: bool = False  # a .json array: read as one piece


@dataclass
class SegmentResult:
    index: int
    tokens: int = 0
    documents: int = 0
    lines: int = 0  # newlines in the segment, to number the lines of the following ones
    errors: list[tuple[str, int | None, str | None, str]] = field(default_factory=list)  # path, line, field, reason
    fatal: bool = False  # an error that stops reading (invalid UTF-8 in a .txt), as read_text_documents does


def text_files(path: str | Path) -> list[Path]:
    """The files `read_text_documents` reads, in its order."""
    p = Path(path)
    files = sorted(q for q in p.iterdir() if q.suffix in (".txt", ".jsonl", ".json")) if p.is_dir() else [p]
    for f in files:
        if not f.is_file():
            raise DataError(f, None, None, "no such data file")
    if not files:
        raise DataError(p, None, None, "no non-empty documents (the folder holds no .txt, .jsonl or .json file)")
    return files


def plan_segments(files: list[Path], workers: int) -> list[Segment]:
    """Byte ranges of about total / (8 x workers) bytes (within 4 KB..8 MB), each ending at a line end."""
    total = sum(f.stat().st_size for f in files)
    size = min(MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, total // max(1, 8 * workers)))
    segments: list[Segment] = []
    for f in files:
        length = f.stat().st_size
        if f.suffix == ".json":
            with open(f, "rb") as fh:
                head = fh.read(4096).lstrip()
            if head[:1] == b"[":
                segments.append(Segment(len(segments), f, 0, length, whole_json=True))
                continue
        with open(f, "rb") as fh:
            start = 0
            while start < length:
                fh.seek(min(start + size, length))
                fh.readline()  # to the end of the line the cut fell into
                end = min(fh.tell(), length)
                segments.append(Segment(len(segments), f, start, end))
                start = end
    return segments


def _documents(seg: Segment, result: SegmentResult) -> list[str]:
    if seg.whole_json:
        docs, items = [], iter_records(seg.path)
    else:
        with open(seg.path, "rb") as fh:
            fh.seek(seg.start)
            data = fh.read(seg.end - seg.start)
        result.lines = data.count(b"\n")
        if seg.path.suffix == ".txt":
            try:
                text = _decode(data, seg.path)
            except DataError as e:
                result.errors.append((str(seg.path), e.line, e.field, e.reason))
                result.fatal = True
                return []
            return [line for line in text.splitlines() if line.strip()]
        docs, items = [], _iter_jsonl(seg.path, data)
    for item in items:
        if isinstance(item, DataError):
            result.errors.append((str(seg.path), item.line, item.field, item.reason))
        elif not isinstance(item[1], dict) or not isinstance(item[1].get("text"), str):
            result.errors.append((str(seg.path), item[0], "text", "missing or not a string"))
        elif item[1]["text"].strip():
            docs.append(item[1]["text"])
    return docs


def tokenize_segment(seg: Segment, out_dir: Path, dtype: str, tokenizer: Any = None) -> SegmentResult:
    """Read, check and tokenize one segment into `out_dir/segment-<index>.bin` (`dtype` ids)."""
    tok = tokenizer if tokenizer is not None else _tokenizer
    result = SegmentResult(seg.index)
    docs = _documents(seg, result)
    result.documents = len(docs)
    eos = tok.eos_token_id
    with open(out_dir / f"segment-{seg.index:07d}.bin", "wb") as out:
        for batch in _batches(docs):
            ids: list[int] = []
            for doc_ids in tok(batch, add_special_tokens=True)["input_ids"]:
                ids.extend(doc_ids)
                if eos is not None and (not doc_ids or doc_ids[-1] != eos):
                    ids.append(eos)
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            result.tokens += len(ids)
    return result


def _batches(docs: list[str]):
    """Consecutive runs of documents of about BATCH_CHARS characters (at least one document each)."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _init_worker(tokenizer: Any) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    if tokenizer is not None:  # spawn start method: the tokenizer came pickled
        _tokenizer = tokenizer


def _run(args: tuple[Segment, Path, str]) -> SegmentResult:
    return tokenize_segment(*args)


def tokenize_segments(segments: list[Segment], tokenizer: Any, out_dir: Path, dtype: str, workers: int):
    """Yield each segment's SegmentResult in order, tokenized by `workers` processes (1: in this process)."""
    global _tokenizer
    jobs = [(seg, out_dir, dtype) for seg in segments]
    if workers <= 1 or len(segments) <= 1:
        for job in jobs:
            yield tokenize_segment(*job, tokenizer=tokenizer)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    _tokenizer = tokenizer
    try:
        with ctx.Pool(min(workers, len(segments)), initializer=_init_worker,
                      initargs=(None if ctx.get_start_method() == "fork" else tokenizer,)) as pool:
            yield from pool.imap(_run, jobs)
    finally:
        _tokenizer = None
