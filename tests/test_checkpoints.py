"""Checkpoints survive a kill (train/checkpoints.py): `--resume-from-checkpoint last` takes the newest
complete checkpoint, says which it skipped and why, and the run ends with the adapter of a run that was
never interrupted; an incomplete checkpoint named explicitly is refused in one line."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run_cli
from lorakit.train.checkpoints import MARKER, checkpoint_problem

FAST = ["--cutoff-len", "64", "--micro-batch-size", "4", "--batch-size", "8", "--warmup-steps", "1",
        "--learning-rate", "1e-3", "--precision", "fp32", "--lora-target-modules", "all-linear", "--nproc", "1",
        "--val-set-size", "0", "--max-steps", "6", "--save-steps", "2", "--logging-steps", "1",
        "--lora-dropout", "0.1"]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tiny_alpaca_json, tmp_path_factory) -> Path:
    """The uninterrupted run: 6 steps, checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_cli("finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, *FAST,
                   "--output-dir", out) == 0
    return out


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)


def test_checkpoints_carry_a_marker_written_last(straight):
    for step in (2, 4, 6):
        folder = straight / f"checkpoint-{step}"
        assert (folder / MARKER).is_file() and checkpoint_problem(folder) is None
        newest = max(p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
        assert (folder / MARKER).stat().st_mtime_ns >= newest


def test_sigkill_while_saving_then_resume_last(straight, tiny_model_dir, tiny_alpaca_json, tmp_path, caplog):
    """A real `lorakit finetune` killed (SIGKILL) the moment checkpoint-4 appears; resuming with `last`
    ends with the uninterrupted run's adapter."""
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "finetune", "--base-model", str(tiny_model_dir),
                             "--data-path", str(tiny_alpaca_json), *FAST, "--output-dir", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint-4").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    problem = checkpoint_problem(out / "checkpoint-4")  # usually incomplete; a fast disk may finish it
    print(f"killed while saving checkpoint-4: {problem or 'it was complete'}")
    assert checkpoint_problem(out / "checkpoint-2") is None

    with caplog.at_level(logging.WARNING, logger="lorakit"):
        assert run_cli("finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, *FAST,
                       "--output-dir", out, "--resume-from-checkpoint", "last") == 0
    if problem is not None:
        assert f"skipping checkpoint-4: {problem}" in caplog.text
    assert_same_adapter(straight, out)


def test_resume_last_skips_incomplete_and_refuses_them_by_name(straight, tiny_model_dir, tiny_alpaca_json,
                                                              tmp_path, caplog, capsys):
    out = tmp_path / "sim"
    out.mkdir()
    for step in (2, 4):
        shutil.copytree(straight / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # killed while writing checkpoint-4 ...
    (out / "checkpoint-5").mkdir()  # ... or the moment its folder appeared

    argv = ["finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, *FAST, "--output-dir", out]
    assert run_cli(*argv, "--resume-from-checkpoint", out / "checkpoint-4") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [f"error: --resume-from-checkpoint {out / 'checkpoint-4'}: incomplete checkpoint: optimizer.pt "
                   "is missing; resume from an earlier checkpoint (or 'last', which skips incomplete ones)"]
    assert run_cli(*argv, "--resume-from-checkpoint", out / "checkpoint-5") == 2
    missing = "trainer_state.json, adapter_model.safetensors, optimizer.pt, scheduler.pt missing"
    assert missing in capsys.readouterr().err

    with caplog.at_level(logging.WARNING, logger="lorakit"):
        assert run_cli(*argv, "--resume-from-checkpoint", "last") == 0
    assert "skipping checkpoint-5: trainer_state.json" in caplog.text
    assert "skipping checkpoint-4: optimizer.pt is missing" in caplog.text
    assert "resuming from checkpoint-2" in caplog.text
    assert_same_adapter(straight, out)
    assert checkpoint_problem(out / "checkpoint-4") is None  # rewritten in place, complete again


def test_no_complete_checkpoint_is_one_line(tiny_model_dir, tiny_alpaca_json, tmp_path, capsys):
    out = tmp_path / "none"
    (out / "checkpoint-2").mkdir(parents=True)
    code = run_cli("finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, *FAST,
                   "--output-dir", out, "--resume-from-checkpoint", "last")
    err = capsys.readouterr().err
    assert code == 2 and "no complete checkpoint in" in err and "Traceback" not in err


def test_named_incomplete_checkpoint_is_refused_before_any_loading(tiny_alpaca_json, tmp_path, capsys):
    """Refused before the base model is even located: the missing model would otherwise be the error."""
    folder = tmp_path / "run" / "checkpoint-4"
    folder.mkdir(parents=True)
    code = run_cli("finetune", "--base-model", tmp_path / "no-such-model", "--data-path", tiny_alpaca_json, *FAST,
                   "--output-dir", tmp_path / "run", "--resume-from-checkpoint", folder)
    err = capsys.readouterr().err
    assert code == 2 and "incomplete checkpoint" in err and "no-such-model" not in err
