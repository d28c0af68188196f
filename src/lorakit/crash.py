"""What a user sees when a verb fails on something that is not their input (a bug, a library error):
one line naming the verb and the error, and where the full traceback was written.

The traceback goes to `lorakit-<verb>-<time>.log` in the verb's output folder when it has one that
exists, else in `$LORAKIT_CACHE/logs` (default ~/.cache/lorakit/logs). `--debug` or LORAKIT_DEBUG=1
prints it on the terminal as well. Exit codes: 0 ok, 2 bad input (lorakit.errors), 1 internal error,
130 interrupted.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(--debug given anywhere on the command line or LORAKIT_DEBUG set, argv without --debug)."""
    env = os.environ.get("LORAKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return env or "--debug" in argv, [a for a in argv if a != "--debug"]


def log_folder(cfg: Any) -> Path:
    """The verb's output folder if it has one that exists, else the cache's logs folder."""
    out = getattr(cfg, "output_dir", None)
    if out and Path(out).expanduser().is_dir():
        return Path(out).expanduser()
    from lorakit.models.resolve import cache_root

    return cache_root() / "logs"


def write_log(verb: str, error: BaseException, cfg: Any) -> Path | None:
    """Write the traceback of `error` (with the command line) to a new log file; None if that failed."""
    text = (f"lorakit {verb} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"command: {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(error)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in dict.fromkeys([log_folder(cfg), log_folder(None)]):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"lorakit-{verb.replace(' ', '-')}-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def report_internal_error(verb: str, error: BaseException, cfg: Any, debug: bool) -> int:
    """Print one line for an unexpected exception (the traceback too with `debug`); return exit code 1."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    path = write_log(verb, error, cfg)
    lines = str(error).strip().splitlines()
    what = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    where = f"traceback in {path}" if path else "the traceback could not be written to a log file"
    hint = "" if debug else "; --debug shows it here"
    print(f"error: lorakit {verb} failed (internal error): {what} ({where}{hint})", file=sys.stderr, flush=True)
    return EXIT_INTERNAL
