"""`--streaming` under DDP: two processes each read the stream and keep their share of every global batch
(accelerate's IterableDatasetShard, batches not dispatched), so each optimizer step trains on the same
examples as one process: the same loss at every step and the same adapter (see test_ddp.py for why)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import build_config
from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import worker_env

COMMON = dict(precision="fp32", lora_dropout=0.0, batch_size=8, max_steps=3, learning_rate=1e-2, warmup_steps=0,
              val_set_size=0, cutoff_len=64, prompt_template="alpaca_short", logging_steps=1, save_steps=100,
              streaming=True)


def test_streamed_two_processes_match_one(tiny_model_dir, data_dir, tmp_path):
    from lorakit.train.finetune import finetune

    data = tmp_path / "d.jsonl"  # 20 examples: step 3 reads 4 of them a second time
    data.write_text("".join(json.dumps(r) + "\n" for r in json.loads((data_dir / "alpaca_en_demo.json")
                                                                      .read_text())[:20]))
    one = tmp_path / "one"
    finetune(build_config(FinetuneConfig, dict(base_model=str(tiny_model_dir), data_path=str(data),
                                               output_dir=str(one), micro_batch_size=4, nproc="1", **COMMON)))
    two = tmp_path / "two"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items() if k != "streaming"]
    proc = subprocess.run([sys.executable, "-m", "lorakit", "finetune", "--nproc", "2", "--base-model",
                           str(tiny_model_dir), "--data-path", str(data), "--output-dir", str(two), "--streaming",
                           "--micro-batch-size", "2", *flags],
                          capture_output=True, text=True, timeout=300, env=worker_env(2, cpu_count=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stderr

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses(one)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-4)
    w_one, w_two = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for k in w_one:
        torch.testing.assert_close(w_two[k], w_one[k], atol=1e-5, rtol=1e-4)
    summary = lambda out: json.loads((out / "train_summary.json").read_text())  # noqa: E731
    assert summary(two)["tokens_seen"] == summary(one)["tokens_seen"] > 0
