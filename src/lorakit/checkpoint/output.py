"""Output locations written atomically, and the tokenizer files that go with a merged model.

Everything is written into a hidden temporary folder/file next to the target and renamed at the end,
so an interrupted run leaves nothing that looks finished (and the rename never crosses file systems).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import ModelNotFoundError, OutputExistsError
from lorakit.leftovers import disk_full_as_error, old_name, partial_prefix, remove_stale_partials
from lorakit.models import adapter_tokenizer_dir

log = logging.getLogger("lorakit")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse `path` when it is a file, or a non-empty folder without `overwrite` (OutputExistsError)."""
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {path} is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`, on failure it is removed."""
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)  # of runs killed before they could clean up (see lorakit/leftovers.py)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(path.name), dir=path.parent))
    try:
        with disk_full_as_error(path, tmp):
            yield tmp
        tmp.chmod(0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=old_name(path.name), dir=path.parent))
            path.rename(old)  # onto the empty folder just made: a unique name no other run can take
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; renamed onto `path` on success."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file {path} exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise OutputExistsError(f"output {path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path, path.stem, path.suffix)
    # keep the suffix: loaders (transformers for GGUF) pick the format by extension
    fd, name = tempfile.mkstemp(prefix=partial_prefix(path.stem), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_full_as_error(path, tmp):
            yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def has_tokenizer(folder: Path) -> bool:
    """True when `folder` holds a tokenizer.model or tokenizer.json."""
    return (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()


def tokenizer_source(tokenizer: str | None, adapter_dirs: list[Path], base_dir: Path) -> Path:
    """The tokenizer a merged model gets: --tokenizer, else the last adapter shipping one (vocabulary
    extension ships the extended tokenizer with the adapter), else the base model's."""
    if tokenizer:
        p = Path(tokenizer).expanduser()
        if p.is_file() or (p.is_dir() and has_tokenizer(p)):
            return p
        raise ModelNotFoundError(tokenizer, [f"tokenizer folder, tokenizer.model or .gguf at {p}"])
    return adapter_tokenizer_dir(adapter_dirs) or base_dir


def copy_tokenizer(source: Path, dest: Path) -> None:
    """Copy the tokenizer files verbatim (a .gguf tokenizer is converted with transformers)."""
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, dest / name)
    elif source.suffix == ".model":
        shutil.copy2(source, dest / "tokenizer.model")
    else:
        from lorakit.models import load_tokenizer

        load_tokenizer(dest, source, add_pad_token=False).save_pretrained(dest)
