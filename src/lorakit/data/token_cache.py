"""Pre-training corpora tokenized once, into an on-disk, memory-mapped token cache.

A cache entry is a folder `<data-cache-dir>/<key>/` holding `tokens.bin` (every document's ids, BOS as the
tokenizer adds it, then EOS, as one flat uint16 array, or uint32 for vocabularies past 65535) and
`meta.json` (counts, what it was built from, how long it took). The key hashes:
- each data file's resolved path, size, modification time and the SHA-256 of its first and last MB;
- the tokenizer: its files (same fingerprint), class, size, BOS/EOS ids, and the ids it gives a fixed
  test text (any change in how it tokenizes changes these);
- the format version of the cache.
The block size is not in the key: blocks are cut from the stream at training time, as views into the
memory map, so another `--block-size` reuses the same tokens.

A second run with the same inputs maps the file and tokenizes nothing. Entries are written into a hidden
temporary folder and renamed into place, so a killed run leaves no entry that looks complete. Under
torchrun the first process of each machine (LOCAL_RANK 0) builds the entry; the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.data.segments import plan_segments, text_files, tokenize_segments
from lorakit.errors import DataError, DataErrors
from lorakit.leftovers import disk_full_as_error, partial_prefix, remove_stale_partials

log = logging.getLogger("lorakit")
FORMAT_VERSION = 1
TOKENS_FILE, META_FILE = "tokens.bin", "meta.json"
PROBE_TEXT = "Hello world! 你好，世界。 café naïve 12345 \t  <tab>\n\nnew line"
EDGE_BYTES = 2**20
TOKENIZER_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                           "*.model", "chat_template*")


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Resolved path, size, mtime and SHA-256 of the first and last MB (the whole file when smaller)."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "edges_sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer: Any, source: Path) -> dict[str, Any]:
    """What decides the token ids: the tokenizer's files and its behaviour on a fixed text."""
    files = [source] if source.is_file() else sorted(
        {f for pattern in TOKENIZER_FILE_PATTERNS for f in source.glob(pattern) if f.is_file()})
    probe = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    return {"class": type(tokenizer).__name__, "size": len(tokenizer), "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id, "probe": hashlib.sha256(json.dumps(probe).encode()).hexdigest(),
            "files": [{**file_fingerprint(f), "path": f.name} for f in files]}


def token_dtype(tokenizer: Any) -> str:
    return "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "uint32"


def cache_key(files: list[Path], tokenizer: Any, tokenizer_source: Path) -> tuple[str, dict[str, Any]]:
    inputs = {"version": FORMAT_VERSION, "files": [file_fingerprint(f) for f in files],
              "tokenizer": tokenizer_fingerprint(tokenizer, tokenizer_source), "dtype": token_dtype(tokenizer),
              "eos_appended": True}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return key, inputs


class TokenCache:
    """A built cache entry: `tokens` is a read-only numpy memmap over tokens.bin (shape [n_tokens])."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        n = int(self.meta["tokens"])
        self.tokens = np.memmap(folder / TOKENS_FILE, dtype=self.meta["dtype"], mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=self.meta["dtype"])

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def complete(folder: Path) -> bool:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            size = (folder / TOKENS_FILE).stat().st_size
        except (OSError, ValueError):
            return False
        return size == int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize


def _raise_errors(results: list, segments: list) -> None:
    """The bad records, with line numbers counted from the start of each file, as read_text_documents reports."""
    lines_before: dict[int, int] = {}
    offset: dict[Path, int] = {}
    for seg, res in zip(segments, results, strict=True):
        lines_before[seg.index] = offset.get(seg.path, 0)
        offset[seg.path] = offset.get(seg.path, 0) + res.lines
    errors = []
    for seg, res in zip(segments, results, strict=True):
        for path, line, fld, reason in res.errors:
            error = DataError(path, None if line is None else line + lines_before[seg.index], fld, reason)
            if res.fatal:
                raise error
            errors.append(error)
    if errors:
        raise DataErrors(errors)


@contextmanager
def building(folder: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """A hidden temporary folder beside `folder` to write a cache entry into, renamed to `folder` when the
    block ends without an error. Removed in any case, with any parent folders this call made. Its name
    records its owner (leftovers.py): the partials of killed runs are removed by the next build of the
    entry, and a full disk is one line."""
    made = [d for d in (folder.parent, *folder.parent.parents) if not d.exists()]  # removed again on failure
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder)  # what runs killed while building this entry left behind
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(folder.name), dir=folder.parent))
    try:
        with disk_full_as_error(folder, tmp):
            yield tmp
        tmp.chmod(0o755)
        try:
            tmp.rename(folder)
        except OSError:  # another run finished the same entry first: keep its copy
            if not complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # innermost first: a failed first run leaves no empty cache folders behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def wait_for_local_rank_0(folder: Path, complete: Callable[[Path], bool], what: str) -> bool:
    """Under torchrun, processes other than each machine's first wait until it has built `folder`: True
    when this process waited (and the entry is now complete)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return False
    log.info("waiting for LOCAL_RANK 0 to tokenize %s into %s", what, folder)
    while not complete(folder):
        time.sleep(0.5)
    return True


def build(folder: Path, files: list[Path], tokenizer: Any, inputs: dict[str, Any], workers: int,
          show_progress: bool = True) -> None:
    """Tokenize `files` into the cache entry `folder` (written beside it, then renamed into place)."""
    from tqdm import tqdm

    with building(folder, TokenCache.complete) as tmp:
        dtype = inputs["dtype"]
        segments = plan_segments(files, workers)
        start = time.perf_counter()
        results, tokens, documents = [], 0, 0
        bar = tqdm(total=sum(s.end - s.start for s in segments), desc="tokenizing", unit="B", unit_scale=True,
                   disable=not show_progress)
        with open(tmp / TOKENS_FILE, "wb") as out:
            for seg, res in zip(segments, tokenize_segments(segments, tokenizer, tmp, dtype, workers), strict=True):
                part = tmp / f"segment-{seg.index:07d}.bin"
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 4 * 2**20)
                part.unlink()
                results.append(res)
                tokens, documents = tokens + res.tokens, documents + res.documents
                bar.update(seg.end - seg.start)
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")
        bar.close()
        _raise_errors(results, segments)
        if not documents:
            raise DataError(files[0] if len(files) == 1 else files[0].parent, None, None, "no non-empty documents")
        seconds = time.perf_counter() - start
        meta = {**inputs, "tokens": tokens, "documents": documents, "seconds": round(seconds, 3),
                "workers": workers, "tokens_per_second": round(tokens / seconds if seconds else 0.0),
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        log.info("tokenized %d documents -> %d tokens in %.1f s (%.0f tokens/s, %d worker%s) into %s", documents,
                 tokens, seconds, meta["tokens_per_second"], workers, "s" if workers > 1 else "", folder)


def load_or_build(data_path: str, tokenizer: Any, tokenizer_source: Path, cache_dir: Path, workers: int,
                  show_progress: bool = True) -> TokenCache:
    """The token cache of `data_path` for `tokenizer`: read when present, else tokenized now."""
    files = text_files(data_path)
    key, inputs = cache_key(files, tokenizer, tokenizer_source)
    folder = cache_dir / key
    if TokenCache.complete(folder):
        cache = TokenCache(folder)
        log.info("token cache hit: %s (%d tokens of %d documents, tokenized %s): nothing to tokenize", folder,
                 len(cache), cache.meta["documents"], cache.meta["created"])
        return cache
    if wait_for_local_rank_0(folder, TokenCache.complete, data_path):  # torchrun: this machine's first builds it
        return TokenCache(folder)
    log.info("token cache miss: tokenizing %s into %s with %d worker%s", data_path, folder, workers,
             "s" if workers > 1 else "")
    build(folder, files, tokenizer, inputs, workers, show_progress)
    return TokenCache(folder)
