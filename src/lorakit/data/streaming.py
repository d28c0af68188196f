"""`--streaming`: training data read and tokenized while training, with no cache (torch IterableDatasets).

The order is the files' order (a folder's files sorted by name, then their records or documents as written),
with no shuffling: the first batches are the cached run's examples 0, 1, 2, ... (shuffle the file beforehand
if its order is not random). The stream does not end: after the last record it reads the files again, so HF
Trainer sees one endless epoch and --max-steps (required) ends training. A resumed run skips the batches
already trained by reading (and tokenizing) them again, which keeps the resume exact across passes. A bad
record stops the run when it is reached (DataError naming file and line, or parquet row), or is skipped with
--skip-invalid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lorakit.data.readers import data_files, iter_examples
from lorakit.data.segments import SegmentResult, _batches, _documents, plan_segments, text_files
from lorakit.data.tokenize import fully_masked, tokenize_example
from lorakit.errors import DataError

log = logging.getLogger("lorakit")


class EndlessStream(IterableDataset):
    """Pass after pass over `_one_pass()`; a pass that yields nothing is an error, not an endless loop."""

    files: list[Path]

    def _one_pass(self) -> Iterator[Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        while True:
            empty = True
            for item in self._one_pass():
                empty = False
                yield item
            if empty:
                where = self.files[0] if len(self.files) == 1 else self.files[0].parent
                raise DataError(where, None, None, "nothing to train on in a whole pass over the data")


class StreamedExamples(EndlessStream):
    """Instruction examples as finetune's features ({"input_ids", "labels", "attention_mask"}: lists of
    T <= cutoff_len ints), tokenized one by one as read; fully masked ones are dropped as the cache drops them."""

    def __init__(self, data_path: str, tokenizer: Any, prompter: Any, cutoff_len: int = 256,
                 train_on_inputs: bool = True, add_eos_token: bool = True, skip_invalid: bool = False):
        self.files = data_files(data_path)
        self.tokenizer, self.prompter, self.cutoff_len = tokenizer, prompter, cutoff_len
        self.train_on_inputs, self.add_eos_token, self.skip_invalid = train_on_inputs, add_eos_token, skip_invalid

    def _one_pass(self) -> Iterator[dict[str, list[int]]]:
        skipped: list[DataError] = []
        for file in self.files:
            for item in iter_examples(file):
                if isinstance(item, DataError):
                    if not self.skip_invalid:
                        raise item
                    skipped.append(item)
                    continue
                feats = tokenize_example(item, self.prompter, self.tokenizer, self.cutoff_len,
                                         self.train_on_inputs, self.add_eos_token)
                if fully_masked(feats["labels"]):
                    continue
                yield feats
        if skipped:
            log.warning("skipped %d invalid record(s) in this pass; first: %s", len(skipped), skipped[0])


class StreamedBlocks(EndlessStream):
    """Pre-training blocks ({"input_ids", "labels", "attention_mask"}: int64 [block_size] each), cut from the
    documents' token stream (BOS as the tokenizer adds it, EOS after each document) as it is tokenized: the
    blocks of TokenBlocks over the token cache, in order; the remainder is dropped."""

    def __init__(self, data_path: str, tokenizer: Any, block_size: int):
        self.files = text_files(data_path)
        self.tokenizer, self.block_size = tokenizer, block_size

    def _token_batches(self) -> Iterator[list[int]]:
        eos = self.tokenizer.eos_token_id
        for file in self.files:
            lines = 0  # lines of the file before the segment, to number its records as the cache does
            for seg in plan_segments([file], 1):
                result = SegmentResult(seg.index)
                docs = _documents(seg, result)
                if result.errors:
                    path, line, field, reason = result.errors[0]
                    raise DataError(path, None if line is None else line + lines, field, reason)
                lines += result.lines
                for batch in _batches(docs):
                    ids: list[int] = []
                    for doc_ids in self.tokenizer(batch, add_special_tokens=True)["input_ids"]:
                        ids.extend(doc_ids)
                        if eos is not None and (not doc_ids or doc_ids[-1] != eos):
                            ids.append(eos)
                    yield ids

    def _one_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer = np.zeros(0, dtype=np.int64)
        for ids in self._token_batches():
            buffer = np.concatenate([buffer, np.asarray(ids, dtype=np.int64)])
            n = len(buffer) // self.block_size
            for i in range(n):
                block = torch.from_numpy(buffer[i * self.block_size:(i + 1) * self.block_size].copy())
                yield {"input_ids": block, "labels": block.clone(), "attention_mask": torch.ones_like(block)}
            buffer = buffer[n * self.block_size:]
