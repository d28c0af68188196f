"""Leftovers of killed merges/exports are removed by the next run into the same target (only those of dead
processes of this machine), and a full disk mid-write gives one line, no partial and the previous output."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorakit.checkpoint.output import atomic_dir, atomic_file
from lorakit.leftovers import DiskFullError, host_tag, is_disk_full, partial_prefix, remove_stale_partials


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the PID names no process (until the kernel reuses it, which would only keep a partial)
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _plant(parent: Path, name: str, pid: int, host: str | None = None, size: int = 1000, suffix: str = "") -> Path:
    entry = parent / f".{name}.partial-{pid}@{host or host_tag()}-abc123{suffix}"
    if suffix:
        entry.write_bytes(b"x" * size)
    else:
        entry.mkdir()
        (entry / "model-00001-of-00002.safetensors").write_bytes(b"x" * size)
    return entry


def test_only_partials_of_dead_processes_of_this_machine_are_removed(tmp_path, live_pid, caplog):
    target = tmp_path / "merged"
    dead = _plant(tmp_path, "merged", dead_pid(), size=3 * 2**20)
    alive = _plant(tmp_path, "merged", live_pid)
    elsewhere = _plant(tmp_path, "merged", dead_pid(), host="0badc0de")  # another machine, shared disk
    legacy = tmp_path / ".merged.partial-k2j4h5"  # no owner recorded: not ours to judge
    legacy.mkdir()
    other_target = _plant(tmp_path, "merged2", dead_pid())
    with caplog.at_level(logging.WARNING, logger="lorakit"), atomic_dir(target, overwrite=False) as tmp:
        assert tmp.name.startswith(partial_prefix("merged")) and not dead.exists()
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    assert not dead.exists() and alive.exists() and elsewhere.exists() and legacy.exists() and other_target.exists()
    assert "removed 1 partial output(s) beside" in caplog.text and "freed 3.0 MB" in caplog.text


def test_a_real_sigkill_leaves_a_partial_that_the_next_export_removes(tmp_path, caplog):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous")
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from lorakit.checkpoint.output import atomic_file
        with atomic_file(Path({str(target)!r}), overwrite=True) as tmp:
            tmp.write_bytes(b"y" * 5 * 2**20)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".model.partial-")]
    assert len(left) == 1 and left[0].suffix == ".gguf" and left[0].stat().st_size == 5 * 2**20
    assert target.read_bytes() == b"previous"
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        assert remove_stale_partials(target, "model", ".gguf") == (1, 5 * 2**20)
        with atomic_file(target, overwrite=True) as tmp:
            tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"] and target.read_bytes() == b"new"
    assert "freed 5.0 MB" in caplog.text


def test_previous_output_parked_by_a_killed_run_is_put_back(tmp_path):
    target = tmp_path / "merged"
    parked = tmp_path / f".merged.old-{dead_pid()}@{host_tag()}-q1w2e3"
    parked.mkdir()
    (parked / "config.json").write_text("old")
    remove_stale_partials(target)
    assert (target / "config.json").read_text() == "old" and not parked.exists()


def _merge_inputs(tmp_path):
    from test_merge import make_adapter
    from tiny_models import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", seed=3)
    return base, make_adapter(base, tmp_path / "adapter", seed=1, target_modules=["q_proj"])


def test_disk_full_during_merge_keeps_the_previous_output(tmp_path, monkeypatch):
    from lorakit.merge import run as merge_run

    base, adapter = _merge_inputs(tmp_path)
    out = tmp_path / "merged"
    merge_run.merge_model(str(base), [str(adapter)], out, verify=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write_merged = merge_run.write_merged

    def write_then_fill_up(plan, writer, progress):
        real_write_merged(plan, writer, progress)  # the shard is on disk, then the next write fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_run, "write_merged", write_then_fill_up)
    with pytest.raises(DiskFullError) as info:
        merge_run.merge_model(str(base), [str(adapter)], out, verify=False, overwrite=True)
    message = str(info.value)
    assert "\n" not in message and f"disk full while writing {out}" in message and "free on" in message
    assert "previous merged is unchanged" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]  # no partial left


def test_disk_full_during_gguf_export_via_the_cli(tmp_path, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.export import gguf_writer
    from tiny_models import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", seed=4)

    class SafetensorError(Exception):  # what a Rust writer raises: the errno only in the text
        pass

    def fill_up(src, dest, outtype):
        Path(dest).write_bytes(b"z" * 4096)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(gguf_writer, "write_gguf", fill_up)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(base), "--format", "gguf", "--output", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert [line for line in err.splitlines() if "disk full" in line] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_other_errors_are_not_called_a_full_disk(tmp_path):
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(ValueError, match="boom"), atomic_dir(tmp_path / "x", overwrite=False):
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
