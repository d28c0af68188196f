"""Trainer checkpoints that are complete or ignored: a run killed while saving never leaves one that a
resume would take.

HF Trainer writes `checkpoint-N/` file by file in place (transformers 5 has no staging folder), so a
machine preempted mid-save leaves an empty or partial folder, and its `get_last_checkpoint` picks it.
`CompleteCheckpoints` (a Trainer mixin) writes `lorakit_checkpoint.json` into the folder LAST, listing
every file with its size, after all processes have finished writing; older checkpoints are rotated
away (`save_total_limit`) only after that, so the newest complete one always survives. A resume then
takes the newest folder whose marker is present and whose files still have the sizes it lists
(`latest_complete_checkpoint`), and says which newer ones it skipped and why; a checkpoint named
explicitly but incomplete is refused in one line naming what is missing (`check_checkpoint`).
Checkpoints without a marker (written by plain HF Trainer) are accepted when the files a resume reads
are all there and readable.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

from lorakit.errors import ConfigError, DamagedFileError
from lorakit.files import write_atomic

log = logging.getLogger("lorakit")
MARKER = "lorakit_checkpoint.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")
# what resuming a LoRA run reads: trainer state, adapter weights, optimizer, scheduler (RNG state is optional)
_NEEDED = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def mark_complete(folder: Path) -> None:
    """Record `folder`'s files and sizes in its marker (written atomically, last)."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    write_atomic(folder / MARKER, json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (what is missing or damaged), or None if it is complete."""
    if not folder.is_dir():
        return "no such folder"
    marker = folder / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text(encoding="utf-8"))["files"]
            items = [(str(k), int(v)) for k, v in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{MARKER} is damaged"
        for name, size in items:
            p = folder / name
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != size:
                return f"{name} has {p.stat().st_size} bytes, {size} when saved"
        return None
    missing = [n for n in _NEEDED if not (folder / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing (the run stopped while saving it)"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        from lorakit.models.headers import safetensors_header

        safetensors_header(folder / "adapter_model.safetensors")
    except (ValueError, DamagedFileError):
        return "trainer_state.json or adapter_model.safetensors is damaged"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not zipfile.is_zipfile(folder / name):
            return f"{name} is damaged (not a complete torch.save archive)"
    return None


def check_checkpoint(folder: str | Path) -> str:
    """`folder` if it can be resumed from; else a one-line ConfigError naming what is missing."""
    problem = checkpoint_problem(Path(folder))
    if problem:
        raise ConfigError(f"--resume-from-checkpoint {folder}: incomplete checkpoint: {problem}; resume from "
                          "an earlier checkpoint (or 'last', which skips incomplete ones)")
    return str(folder)


LAST = ("last", "latest", "true", "True")  # --resume-from-checkpoint spellings of "the newest complete one"


def refuse_named_incomplete(spec: str | None) -> None:
    """Before anything loads: a checkpoint folder named by --resume-from-checkpoint must be complete
    (a one-line ConfigError otherwise). 'last' and adapter folders are resolved later, in the engine."""
    if spec and spec not in LAST and (is_checkpoint_dir(Path(spec)) or (Path(spec) / "trainer_state.json").is_file()):
        check_checkpoint(spec)


def is_checkpoint_dir(path: Path) -> bool:
    """A Trainer checkpoint folder by its name (checkpoint-N), whatever it holds."""
    return bool(_STEP.match(path.name))


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str | Path, spec: str = "last") -> str:
    """The newest complete `checkpoint-N` in `output_dir`; skipped newer ones are logged with the reason."""
    out = Path(output_dir)
    candidates = checkpoints_newest_first(out) if out.is_dir() else []
    skipped: list[str] = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                log.warning("resuming from %s", folder.name)
            return str(folder)
        log.warning("skipping %s: %s", folder.name, problem)
        skipped.append(f"{folder.name} ({problem})")
    if skipped:
        raise ConfigError(f"--resume-from-checkpoint {spec}: no complete checkpoint in {out}: "
                          f"{'; '.join(skipped)}")
    raise ConfigError(f"--resume-from-checkpoint {spec}: no checkpoint-* folder in {out}")


class CompleteCheckpoints:
    """Trainer mixin: each checkpoint gets its completion marker once every process has written its part,
    and old checkpoints are rotated away only after that."""

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            (folder / MARKER).unlink(missing_ok=True)  # a checkpoint rewritten in place is incomplete meanwhile
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate below, once the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process has written its files (e.g. its RNG state)
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
