"""--nproc auto: one process per core on a CPU-only machine when the job is long enough and fits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit.config import build_config
from lorakit.errors import ConfigError
from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import (
    MIN_AUTO_WORK_FLOP,
    PROCESS_OVERHEAD_BYTES,
    auto_nproc,
    relaunch_if_needed,
    training_work,
)

GB = 2**30
SMOLLM2 = 135_000_000


def _cfg(tmp_path, data_bytes: int, **kw) -> FinetuneConfig:
    data = tmp_path / "train.json"
    data.write_bytes(b" " * data_bytes)
    options = dict(base_model="x", data_path=str(data), output_dir=str(tmp_path / "o"), batch_size=16,
                   micro_batch_size=4, num_epochs=1)
    return build_config(FinetuneConfig, {**options, **kw})


def test_long_cpu_job_gets_a_process_per_core(tmp_path):
    cfg = _cfg(tmp_path, 200_000)  # ~50k tokens of SmolLM2: ~40 TFLOP
    assert training_work(cfg, SMOLLM2) == pytest.approx(6 * SMOLLM2 * 50_000)
    n, why = auto_nproc(cfg, SMOLLM2, 2, cores=2, available=20 * GB, has_gpu=False)
    assert n == 2 and "2 cores" in why
    assert auto_nproc(cfg, SMOLLM2, 2, cores=4, available=20 * GB, has_gpu=False)[0] == 4


@pytest.mark.parametrize("case,expected_reason", [
    ("short", "short job"), ("gpu", "GPU"), ("one_core", "one core"), ("memory", "would not fit"),
    ("split", "does not split")])
def test_auto_stays_at_one_process(tmp_path, case, expected_reason):
    cfg = _cfg(tmp_path, 200_000, **({"batch_size": 12} if case == "split" else {}))
    args = dict(n_params=SMOLLM2, weight_bytes=2, cores=2, available=20 * GB, has_gpu=False)
    if case == "short":  # 4 TFLOP: about 20 alpaca examples, ~10 s of training
        cfg = _cfg(tmp_path, 20_000)
        assert training_work(cfg, SMOLLM2) < MIN_AUTO_WORK_FLOP
    elif case == "gpu":
        args["has_gpu"] = True
    elif case == "one_core":
        args["cores"] = 1
    elif case == "memory":  # a 7B model in bf16: two copies do not fit in 24 GB
        args.update(n_params=7_000_000_000, available=22 * GB)
    n, why = auto_nproc(cfg, **args)
    assert n == 1 and expected_reason in why, why


def test_memory_and_split_pick_the_largest_count_that_works(tmp_path):
    cfg = _cfg(tmp_path, 2_000_000, batch_size=24, micro_batch_size=4)  # 24 = 4 x 2 x 3: 3 or 2 split, 4 does not
    assert auto_nproc(cfg, SMOLLM2, 2, cores=4, available=64 * GB, has_gpu=False)[0] == 3
    one_gb_model = 500_000_000
    per_process = one_gb_model * 2 + PROCESS_OVERHEAD_BYTES
    room_for_two = int(2.5 * per_process / 0.8)
    assert auto_nproc(cfg, one_gb_model, 2, cores=4, available=room_for_two, has_gpu=False)[0] == 2
    # fully trained embeddings (pretrain): fp32 weight, gradient and two AdamW moments per process
    embeddings = 2 * 32_000 * 2048
    assert auto_nproc(cfg, one_gb_model, 2, cores=4, available=room_for_two, has_gpu=False,
                      full_params=embeddings)[0] == 1


def test_cores_are_physical_and_within_the_affinity_mask():
    import os

    from lorakit.machine import usable_cores

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def test_max_steps_bounds_the_work(tmp_path):
    cfg = _cfg(tmp_path, 10_000_000, max_steps=2, cutoff_len=256)
    assert training_work(cfg, SMOLLM2) == pytest.approx(6 * SMOLLM2 * 2 * 16 * 256)


def test_nproc_values(tmp_path):
    assert _cfg(tmp_path, 10).nproc == "auto"
    assert _cfg(tmp_path, 10, nproc=3).nproc == "3"
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="--nproc"):
            _cfg(tmp_path, 10, nproc=bad)


def test_inside_a_launcher_auto_never_relaunches(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert relaunch_if_needed(_cfg(tmp_path, 10_000_000), "finetune") is None
    with pytest.raises(ConfigError, match="inside a launcher"):
        relaunch_if_needed(_cfg(tmp_path, 10, nproc=3), "finetune")


def test_train_as_configured_returns_the_summary_of_either_path(tmp_path, monkeypatch):
    import json
    from dataclasses import asdict
    from types import SimpleNamespace

    from lorakit.errors import LorakitError
    from lorakit.train import launch
    from lorakit.train.summary import SUMMARY_FILE, TrainSummary

    written = TrainSummary(output_dir=str(tmp_path), global_step=3, train_loss=1.5, eval_loss=None, train_seconds=2.0,
                           tokens_seen=100, tokens_per_second=50.0, peak_rss_mb=900.0, precision="bf16",
                           trainable_params=10, processes=2, peak_rss_mb_all=1800.0, cpu_seconds=3.9)
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(asdict(written)))
    cfg = SimpleNamespace(output_dir=str(tmp_path))

    def not_here(cfg):
        raise AssertionError("trained in this process although the launcher ran")

    monkeypatch.setattr(launch, "relaunch_if_needed", lambda cfg, verb: 0)  # torchrun ran and succeeded
    assert launch.train_as_configured(cfg, "finetune", not_here) == written
    monkeypatch.setattr(launch, "relaunch_if_needed", lambda cfg, verb: 1)
    with pytest.raises(LorakitError, match="exit code 1"):
        launch.train_as_configured(cfg, "finetune", not_here)
    monkeypatch.setattr(launch, "relaunch_if_needed", lambda cfg, verb: None)  # one process: here
    assert launch.train_as_configured(cfg, "finetune", lambda cfg: "trained here") == "trained here"


def test_the_verbs_decide_on_a_relaunch_before_importing_the_training_stack():
    """A relaunching parent only starts torchrun and waits: importing transformers' Trainer and peft there
    (3.3 s here) would delay the workers for nothing."""
    code = ("import sys, lorakit.cli, lorakit.train.commands, lorakit.train.launch; "
            "print(sorted(m for m in ('transformers', 'peft', 'lorakit.train.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
