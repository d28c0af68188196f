"""Instruction data tokenized once, into an on-disk, memory-mapped cache (the finetune side of token_cache.py).

A cache entry `<data-cache-dir>/<key>/` holds, for the N examples kept after tokenization, in data order:
- `input_ids.bin`: every example's ids, one after another (uint16, or uint32 past 65535 tokens);
- `label_mask.bin`: one byte per token, 1 where the label is the id, 0 where it is -100 (the prompt mask);
- `offsets.bin`: int64 [N + 1], example i is tokens [offsets[i], offsets[i+1]);
- `meta.json`: what it was built from, counts, time.
The key hashes the data files and the tokenizer as token_cache.py does, plus every option that changes the
tokens: the prompt template (its text, or the chat template), cutoff_len, train_on_inputs, add_eos_token and
skip_invalid. The validation split is not in the key: it picks examples of the cache (`ExampleCache.split`,
the same examples as finetune's split_validation), so another --val-set-size or --seed reuses the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.data.example_workers import batches, tokenize_in_workers
from lorakit.data.holdout import held_out
from lorakit.data.readers import data_files, iter_examples
from lorakit.data.token_cache import (
    building,
    file_fingerprint,
    token_dtype,
    tokenizer_fingerprint,
    wait_for_local_rank_0,
)
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.errors import ConfigError, DataError, DataErrors

log = logging.getLogger("lorakit")
FORMAT_VERSION = 1
IDS_FILE, MASK_FILE, OFFSETS_FILE, META_FILE = "input_ids.bin", "label_mask.bin", "offsets.bin", "meta.json"


def token_options(prompter: Any, cutoff_len: int, train_on_inputs: bool, add_eos_token: bool,
                  skip_invalid: bool) -> dict[str, Any]:
    """The options that change the tokens (part of the cache key)."""
    template = asdict(prompter.template) if hasattr(prompter, "template") else \
        {"chat_template": prompter.tokenizer.chat_template}
    return {"prompter": prompter.name, "template": template, "cutoff_len": cutoff_len,
            "train_on_inputs": train_on_inputs, "add_eos_token": add_eos_token, "skip_invalid": skip_invalid}


def cache_key(files: list[Path], tokenizer: Any, tokenizer_source: Path, options: dict[str, Any]
              ) -> tuple[str, dict[str, Any]]:
    inputs = {"kind": "examples", "version": FORMAT_VERSION, "files": [file_fingerprint(f) for f in files],
              "tokenizer": tokenizer_fingerprint(tokenizer, tokenizer_source), "dtype": token_dtype(tokenizer),
              "options": options}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24], inputs


class ExampleCache(torch.utils.data.Dataset):
    """Examples of a built entry (all of them, or those of `index`), as finetune's features:
    {"input_ids", "labels", "attention_mask"}: lists of T ints each, T <= cutoff_len."""

    def __init__(self, folder: Path, index: np.ndarray | None = None):
        self.folder = folder
        self.meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        n, tokens = int(self.meta["examples"]), int(self.meta["tokens"])
        self.ids = np.memmap(folder / IDS_FILE, dtype=self.meta["dtype"], mode="r", shape=(tokens,))
        self.mask = np.memmap(folder / MASK_FILE, dtype=np.uint8, mode="r", shape=(tokens,))
        self.offsets = np.memmap(folder / OFFSETS_FILE, dtype=np.int64, mode="r", shape=(n + 1,))
        self.index = np.arange(n, dtype=np.int64) if index is None else index

    def _view(self, index: np.ndarray) -> ExampleCache:
        view = object.__new__(ExampleCache)
        view.__dict__.update(self.__dict__, index=index)
        return view

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        """[len(self)] int64: each example's length in tokens (for samplers; no example is read)."""
        return self.offsets[self.index + 1] - self.offsets[self.index]

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        k = int(self.index[i])
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        ids = self.ids[start:end].astype(np.int64)
        labels = np.where(self.mask[start:end] == 1, ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": [1] * (end - start)}

    def split(self, val_set_size: int, seed: int) -> tuple[ExampleCache, ExampleCache | None]:
        """(train, validation): the examples finetune's split_validation holds out, in its order."""
        n = len(self)
        held = np.asarray(held_out(n, val_set_size, seed), dtype=np.int64)
        if not len(held):
            return self, None
        keep = np.ones(n, dtype=bool)
        keep[held] = False
        return self._view(self.index[keep]), self._view(self.index[held])

    @staticmethod
    def complete(folder: Path) -> bool:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            sizes = [(folder / name).stat().st_size for name in (IDS_FILE, MASK_FILE, OFFSETS_FILE)]
        except (OSError, ValueError):
            return False
        tokens = int(meta["tokens"])
        return sizes == [tokens * np.dtype(meta["dtype"]).itemsize, tokens, 8 * (int(meta["examples"]) + 1)]


def _valid_examples(files: list[Path], errors: list[DataError], skip_invalid: bool):
    """The valid examples of `files` in order; bad records go to `errors`. After a bad record without
    --skip-invalid the files are still read to the end, to report every error, but nothing more is yielded."""
    for file in files:
        for item in iter_examples(file):
            if isinstance(item, DataError):
                errors.append(item)
            elif skip_invalid or not errors:
                yield item


def build(folder: Path, files: list[Path], job: dict[str, Any], inputs: dict[str, Any], workers: int,
          show_progress: bool = True) -> None:
    """Read, check and tokenize `files` into the entry `folder` (written beside it, then renamed into place)."""
    from tqdm import tqdm

    skip_invalid = inputs["options"]["skip_invalid"]
    with building(folder, ExampleCache.complete) as tmp:
        errors: list[DataError] = []
        examples = _valid_examples(files, errors, skip_invalid)
        offsets, seen, dropped, start = array("q", [0]), 0, 0, time.perf_counter()
        cpu: dict[int, float] = {}  # tokenizing CPU seconds by process
        bar = tqdm(desc="tokenizing", unit=" examples", disable=not show_progress)
        with open(tmp / IDS_FILE, "wb") as ids_out, open(tmp / MASK_FILE, "wb") as mask_out:
            for result in tokenize_in_workers(batches(examples), job, workers):
                if result.error:
                    raise DataError(*result.error)
                ids_out.write(result.ids.astype(inputs["dtype"]).tobytes())
                mask_out.write(result.mask.tobytes())
                offsets.extend((offsets[-1] + np.cumsum(result.lengths)).tolist())
                seen, dropped = seen + result.examples, dropped + result.dropped
                cpu[result.pid] = cpu.get(result.pid, 0.0) + result.cpu_seconds
                bar.update(result.examples)
                bar.set_postfix_str(f"{offsets[-1] / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")
        bar.close()
        if errors and not skip_invalid:
            raise DataErrors(errors)
        if not seen:
            raise DataError(files[0] if len(files) == 1 else files[0].parent, None, None, "no valid records")
        if len(offsets) == 1:
            raise ConfigError(f"no training examples left after tokenization: every response was cut off at "
                              f"--cutoff-len {job['cutoff_len']}")
        np.asarray(offsets, dtype=np.int64).tofile(tmp / OFFSETS_FILE)
        seconds = time.perf_counter() - start
        meta = {**inputs, "examples": len(offsets) - 1, "tokens": offsets[-1], "read": seen, "dropped": dropped,
                "skipped": len(errors), "first_skipped": str(errors[0]) if errors else None,
                "seconds": round(seconds, 3), "workers": workers,
                "tokenizing_cpu_seconds": sorted((round(c, 3) for c in cpu.values()), reverse=True),
                "examples_per_second": round(seen / seconds if seconds else 0.0),
                "tokens_per_second": round(offsets[-1] / seconds if seconds else 0.0),
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        log.info("tokenized %d examples -> %d tokens in %.1f s (%.0f examples/s, %.0f tokens/s, %d worker%s) into %s",
                 seen, offsets[-1], seconds, meta["examples_per_second"], meta["tokens_per_second"], workers,
                 "s" if workers > 1 else "", folder)


def load_or_build(data_path: str, tokenizer: Any, tokenizer_source: Path, prompter: Any, cache_dir: Path,
                  workers: int, cutoff_len: int = 256, train_on_inputs: bool = True, add_eos_token: bool = True,
                  skip_invalid: bool = False, show_progress: bool = True) -> ExampleCache:
    """The tokenized examples of `data_path`: read from the cache when present, else tokenized now."""
    files = data_files(data_path)
    for f in files:
        if not f.is_file():
            raise DataError(f, None, None, "no such data file")
    options = token_options(prompter, cutoff_len, train_on_inputs, add_eos_token, skip_invalid)
    key, inputs = cache_key(files, tokenizer, tokenizer_source, options)
    folder = cache_dir / key
    if ExampleCache.complete(folder):
        cache = ExampleCache(folder)
        log.info("token cache hit: %s (%d examples, %d tokens, tokenized %s): nothing to tokenize", folder,
                 len(cache), cache.meta["tokens"], cache.meta["created"])
    elif wait_for_local_rank_0(folder, ExampleCache.complete, data_path):
        cache = ExampleCache(folder)
    else:
        log.info("token cache miss: tokenizing %s into %s with %d worker%s", data_path, folder, workers,
                 "s" if workers > 1 else "")
        job = {"tokenizer": tokenizer, "prompter": prompter, "cutoff_len": cutoff_len,
               "train_on_inputs": train_on_inputs, "add_eos_token": add_eos_token}
        build(folder, files, job, inputs, workers, show_progress)
        cache = ExampleCache(folder)
    if cache.meta["skipped"]:
        log.warning("skipped %d invalid record(s); first: %s", cache.meta["skipped"], cache.meta["first_skipped"])
    if cache.meta["dropped"]:
        log.warning("dropped %d example(s) whose response was cut off entirely at --cutoff-len %d",
                    cache.meta["dropped"], cutoff_len)
    return cache
