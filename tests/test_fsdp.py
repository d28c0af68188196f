"""`--fsdp` on CPU: two gloo processes with FSDP2 (`fully_shard` through HF Trainer/accelerate) follow the same
loss curve as DDP with two processes, and the adapter, gathered to rank 0, loads with PeftModel.from_pretrained
and gives the DDP adapter's logits.

FSDP reshards every weight and reduce-scatters the gradients instead of all-reducing them: the same sums in
a different order, so the curves agree to float32 rounding (measured: bit-identical losses and adapter on the
tiny model; the tolerance below leaves room for a different summation order only). A run that trained
on half the data per step, or whose ranks drifted apart, would leave the tolerance at the first step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorakit.train.fsdp import fsdp_arguments
from lorakit.train.launch import worker_env

COMMON = dict(precision="fp32", lora_dropout=0.0, batch_size=8, micro_batch_size=2, num_epochs=4,
              learning_rate=1e-2, warmup_steps=0, val_set_size=0, cutoff_len=64, prompt_template="alpaca_short",
              logging_steps=1, save_steps=100, lora_target_modules="q_proj,v_proj,o_proj", nproc=2)
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def data8(data_dir, tmp_path_factory):
    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:8]
    path = tmp_path_factory.mktemp("fsdp") / "train8.json"
    path.write_text(json.dumps(records))
    return path


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_fsdp_on_two_cpu_processes_matches_ddp(tiny_model_dir, data8, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = tmp_path / name
        runs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "lorakit", "finetune", "--base-model", str(tiny_model_dir), "--data-path",
             str(data8), "--output-dir", str(out), *flags, *extra],
            env=worker_env(2, cpu_count=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = {}
    for name, (_out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.count("done: 4 steps") == 1
        logs[name] = stderr
    assert logs["fsdp"].count("FSDP2 on CPU: fully_shard over 2 gloo processes") == 2  # on both ranks
    assert "FSDP2" not in logs["ddp"]

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert len(_losses(ddp)) == 4
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=LOSS_RTOL)
    assert _losses(ddp)[-1] < _losses(ddp)[0]  # the curve moves: the comparison is not of constants

    # the saved adapter (full state gathered on rank 0) loads as usual and is the DDP run's adapter
    ids = torch.tensor([[1, 450, 4996, 1354, 1701, 432, 2889]])  # the tiny vocabulary has 16000 tokens
    logits = {}
    for name, folder in (("ddp", ddp), ("fsdp", fsdp)):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], atol=1e-5, rtol=1e-4)
    assert (logits["fsdp"] - plain).abs().max() > 1e-3  # the adapter changes the model


def test_fsdp_arguments():
    assert fsdp_arguments(False) == {}
    args = fsdp_arguments(True)
    assert args["fsdp"] == "full_shard" and args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
