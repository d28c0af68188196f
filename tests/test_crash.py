"""No traceback reaches a user (lorakit/crash.py via cli.main): an unexpected exception is one line naming
the verb and the error, the traceback goes to a log file (the output folder, else the cache), --debug or
LORAKIT_DEBUG=1 shows it; exit codes 0 ok, 2 bad input, 1 internal error, 130 interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run_cli


def _boom(cfg):
    raise RuntimeError("boom: the library fell over\nsecond line")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAKIT_DEBUG", raising=False)
    return tmp_path / "cache"


def _only_log(folder: Path) -> Path:
    logs = list(folder.glob("lorakit-*.log"))
    assert len(logs) == 1, logs
    return logs[0]


def test_internal_error_is_one_line_with_the_log_in_the_cache(cache, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.vocab.stats.run_vocab_stats", _boom)
    assert run_cli("vocab", "stats", "--tokenizer", "x.model", "--text", "t.txt") == 1
    err = capsys.readouterr().err
    log = _only_log(cache / "logs")
    assert err.splitlines() == [f"error: lorakit vocab stats failed (internal error): RuntimeError: boom: the "
                                f"library fell over (traceback in {log}; --debug shows it here)"]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in _boom" in text and "second line" in text


def test_log_goes_to_the_existing_output_folder(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lorakit.merge.run.run_merge", _boom)
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("merge", "--lora-model", "a", "--output-dir", out) == 1
    log = _only_log(out)
    assert f"traceback in {log}" in capsys.readouterr().err
    assert not (cache / "logs").exists()


@pytest.mark.parametrize("how", ["flag", "flag-before-verb", "env"])
def test_debug_shows_the_traceback(cache, monkeypatch, capsys, how):
    monkeypatch.setattr("lorakit.vocab.stats.run_vocab_stats", _boom)
    argv = ["vocab", "stats", "--tokenizer", "x.model", "--text", "t.txt"]
    if how == "flag":
        argv.append("--debug")
    elif how == "flag-before-verb":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("LORAKIT_DEBUG", "1")
    assert run_cli(*argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in _boom" in err
    assert err.splitlines()[-1].startswith("error: lorakit vocab stats failed (internal error): RuntimeError")


def test_exit_codes_bad_input_and_interrupt(cache, monkeypatch, capsys):
    assert run_cli("vocab", "stats", "--tokenizer", "x.model", "--text", "t.txt", "--max-lines", "x") == 2

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.vocab.stats.run_vocab_stats", interrupted)
    assert run_cli("vocab", "stats", "--tokenizer", "x.model", "--text", "t.txt") == 130
    assert "Traceback" not in capsys.readouterr().err


def test_real_process_exit_code_and_stderr(tmp_path):
    """A real `python` process: exit status 1, one line on stderr, the traceback only in the log."""
    code = ("import sys, lorakit.cli, lorakit.vocab.stats as s\n"
            "def boom(cfg): raise ValueError('deep inside')\n"
            "s.run_vocab_stats = boom\n"
            "lorakit.cli.main()\n")
    env = dict(os.environ, LORAKIT_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("LORAKIT_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code, "vocab", "stats", "--tokenizer", "x.model", "--text", "t.txt"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lorakit vocab stats failed (internal error): ValueError: deep inside" in lines[0]
    assert "deep inside" in _only_log(tmp_path / "cache" / "logs").read_text()
