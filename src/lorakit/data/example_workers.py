"""Instruction examples read in order and tokenized in batches by worker processes (for the example cache).

The main process reads and validates the records (data/readers.py: the same errors, naming file and line,
or parquet row) and deals batches of examples to `workers` processes; each tokenizes its batch exactly as
`tokenize_examples` does and sends back flat arrays: the ids, a label mask (1: the label is the id, 0: -100)
and each example's length. Results come back in the order of the data; at most 2 x workers batches are in
flight, so memory does not grow with the data.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorakit.data.readers import Example
from lorakit.data.tokenize import IGNORE_INDEX, fully_masked, tokenize_example
from lorakit.errors import DataError

BATCH_EXAMPLES = 64
_job: dict[str, Any] = {}  # the workers' tokenizer, prompter and options (inherited through fork or pickled)


@dataclass
class BatchResult:
    ids: np.ndarray  # [tokens] int64: the kept examples' input_ids, one after another
    mask: np.ndarray  # [tokens] uint8: 1 where labels == input_ids, 0 where labels are -100
    lengths: np.ndarray  # [kept examples] int64
    examples: int  # examples in the batch, kept or not
    dropped: int = 0  # examples whose labels were all masked (prompt at least cutoff_len long)
    error: tuple[str, int | None, str | None, str] | None = None  # a DataError's path, line, field, reason
    pid: int = 0  # the process that tokenized the batch, and the CPU seconds it took (for benchmarks)
    cpu_seconds: float = 0.0


def tokenize_batch(batch: list[Example], job: dict[str, Any] | None = None) -> BatchResult:
    """Tokenize `batch` as tokenize_examples(drop_fully_masked=True) does, into flat arrays."""
    job = job or _job
    cpu_start = time.process_time()
    ids: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    dropped = 0
    for example in batch:
        try:
            feats = tokenize_example(example, job["prompter"], job["tokenizer"], job["cutoff_len"],
                                     job["train_on_inputs"], job["add_eos_token"])
        except DataError as e:  # DataError does not pickle (four arguments): sent back as its parts
            return BatchResult(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64), len(batch),
                               error=(e.path, e.line, e.field, e.reason))
        x, y = feats["input_ids"], feats["labels"]
        if fully_masked(y):
            dropped += 1
            continue
        keep = [int(label != IGNORE_INDEX) for label in y]
        if any(k and label != i for k, label, i in zip(keep, y, x, strict=True)):
            raise AssertionError(f"{example.where}: a label that is neither the input id nor {IGNORE_INDEX}")
        ids += x
        mask += keep
        lengths.append(len(x))
    return BatchResult(np.asarray(ids, np.int64), np.asarray(mask, np.uint8), np.asarray(lengths, np.int64),
                       len(batch), dropped, pid=os.getpid(), cpu_seconds=time.process_time() - cpu_start)


def batches(examples: Iterable[Example], size: int = BATCH_EXAMPLES) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _init_worker(job: dict[str, Any] | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    if job is not None:  # spawn start method: the job came pickled
        _job.update(job)


def _run(batch: list[Example]) -> BatchResult:
    return tokenize_batch(batch)


def tokenize_in_workers(batches_in: Iterable[list[Example]], job: dict[str, Any], workers: int
                        ) -> Iterator[BatchResult]:
    """Each batch's BatchResult in order, tokenized by `workers` processes (1: in this process)."""
    if workers <= 1:
        for batch in batches_in:
            yield tokenize_batch(batch, job)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    _job.update(job)
    try:
        with ctx.Pool(workers, initializer=_init_worker,
                      initargs=(None if ctx.get_start_method() == "fork" else job,)) as pool:
            pending: deque = deque()
            for batch in batches_in:
                pending.append(pool.apply_async(_run, (batch,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _job.clear()
