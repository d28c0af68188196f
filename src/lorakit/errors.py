"""User-facing errors. The CLI prints their message (no traceback) and exits with `exit_code`."""

from __future__ import annotations

from pathlib import Path


class LorakitError(Exception):
    """Base for errors caused by the user's input rather than by a bug."""

    exit_code = 2


class ConfigError(LorakitError):
    """A flag or config key is unknown, of the wrong type, or inconsistent with another."""


class ModelNotFoundError(LorakitError):
    """A model, tokenizer or adapter could not be located."""

    def __init__(self, name: str, tried: list[str]):
        lines = "\n".join(f"  - {t}" for t in tried)
        super().__init__(f"{name}: not found ({tried[0]})" if len(tried) == 1 else
                         f"model {name!r} not found. Tried:\n{lines}")
        self.name, self.tried = name, tried


class MismatchError(LorakitError):
    """Two artifacts that must agree do not (tokenizer vs. embeddings, adapter vs. base)."""


class DataError(LorakitError):
    """One bad record in a data file, located by file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field, self.reason = str(path), line, field, message


class DataErrors(LorakitError):
    """Several bad records; the message lists the first few and the total count."""

    def __init__(self, errors: list[DataError], shown: int = 10):
        head = "\n".join(str(e) for e in errors[:shown])
        more = f"\n... and {len(errors) - shown} more" if len(errors) > shown else ""
        hint = "\n(use --skip-invalid to skip invalid records instead)"
        super().__init__(f"{len(errors)} invalid record(s):\n{head}{more}{hint}")
        self.errors = errors


class OutputExistsError(LorakitError):
    """The output location already holds something and `--overwrite` was not given."""


class DamagedFileError(LorakitError):
    """A file lorakit reads is missing, empty, truncated, corrupt or not the kind of file it should be.

    The message is one line: the file, what is wrong with it, and what to do."""

    def __init__(self, path: str | Path, problem: str, advice: str = ""):
        super().__init__(f"{path}: {problem}" + (f"; {advice}" if advice else ""))
        self.path, self.problem, self.advice = str(path), problem, advice
