"""What an interrupted write leaves behind, and a disk that fills up mid-write.

`merge` and `export` write into a hidden `.NAME.partial-*` folder or file beside the target and rename it at
the end (merge/output.py). A run killed with SIGKILL (or by the OOM killer, or a power cut) cannot remove
it: a 7B model leaves 13 GB behind, unseen. The partial's name therefore records its owner,
`.NAME.partial-<pid>@<host>-<random>`, and the next run into the same target removes the partials whose
owner is this machine's and no longer alive, and says how much it freed. Partials of a live process (a
concurrent run), of another machine (a shared file system) or without an owner (older lorakit) are left.

A full disk (ENOSPC, or a quota: EDQUOT) while writing becomes one line naming the target and the free
space; the partial output is removed and whatever the target held before stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# what libraries that do their own I/O (safetensors in Rust, torch's zip writer) put in their messages
DISK_FULL_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")
_OWNER = re.compile(r"(\d+)@([0-9a-f]{8})-")


class DiskFullError(LorakitError):
    """The disk (or a quota) filled up while writing an output; nothing was left half-written."""


def host_tag() -> str:
    """8 hex digits naming this machine (PIDs mean something only on the machine that made them)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def partial_prefix(name: str) -> str:
    """The name start of this process's temporary output for target `name` (a mkdtemp/mkstemp prefix)."""
    return f".{name}.partial-{os.getpid()}@{host_tag()}-"


def old_name(name: str) -> str:
    """Where atomic_dir parks the previous output for the moment between two renames."""
    return f".{name}.old-{os.getpid()}@{host_tag()}-"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _dead_owner(entry_name: str, start: str) -> bool:
    match = _OWNER.match(entry_name[len(start):])
    if not match or match.group(2) != host_tag():
        return False
    pid = int(match.group(1))
    return pid != os.getpid() and not pid_alive(pid)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def remove_stale_partials(target: Path, name: str | None = None, suffix: str = "") -> tuple[int, int]:
    """Remove the partial outputs for `target` left by dead processes of this machine: (count, bytes freed).

    `name` is the name the partials start with (the target's stem for a file written with its suffix kept,
    `suffix`). A previous output parked by a run killed between its two renames (`.NAME.old-*`) goes back
    into place when the target is missing, and is removed when the target is there."""
    name = target.name if name is None else name
    parent = target.parent
    if not parent.is_dir():
        return 0, 0
    start, old_start = f".{name}.partial-", f".{target.name}.old-"
    count = freed = 0
    for entry in sorted(parent.iterdir()):
        if entry.name.startswith(start) and entry.name.endswith(suffix) and _dead_owner(entry.name, start):
            size = _size(entry)
            _remove(entry)
            count, freed = count + 1, freed + size
        elif entry.name.startswith(old_start) and _dead_owner(entry.name, old_start):
            if target.exists():
                size = _size(entry)
                _remove(entry)
                count, freed = count + 1, freed + size
            else:
                entry.rename(target)
                log.warning("%s: put back the previous output an interrupted run had moved aside", target)
    if count:
        log.warning("removed %d partial output(s) beside %s left by interrupted runs: freed %s", count, target,
                    human_bytes(freed))
    return count, freed


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from, says the disk or a quota is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(e).lower() for text in DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def disk_full_as_error(target: Path, partial: Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into one DiskFullError line naming `target` and the free space
    (measured after removing the `partial` output)."""
    had_previous = target.exists()
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        if partial is not None:
            _remove(partial)
        try:
            free = human_bytes(shutil.disk_usage(target.parent).free)
        except OSError:
            free = "unknown"
        kept = f"; the previous {target.name} is unchanged" if had_previous else ""
        raise DiskFullError(f"disk full while writing {target} ({free} free on its file system): the partial "
                            f"output was removed{kept}. Free some space or choose another output location") from e
