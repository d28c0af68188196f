"""Data-parallel training on CPU: `lorakit finetune --nproc 2` (torchrun, 2 gloo processes) must finish
on both ranks, write the outputs once (rank 0), and train the same adapter as one process with the
same global batch.

Why the comparison is meaningful: the global batch is the whole training set (8 examples) and every
optimizer step is one full pass, so the gradient of a step does not depend on which rank or
micro-batch sees which example; the two runs differ in how the batch is split (1 process x 2
micro-batches of 4, or 2 processes x 2 micro-batches of 2). A run where the ranks saw the same data,
or where accumulation was not divided by the world size, would take different steps (or a different
number of them) and fail the comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import build_config
from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import torchrun_command, worker_env

COMMON = dict(precision="fp32", lora_dropout=0.0, batch_size=8, num_epochs=2, learning_rate=1e-2, warmup_steps=0,
              val_set_size=4, cutoff_len=64, prompt_template="alpaca_short", logging_steps=1, eval_steps=100,
              save_steps=100, lora_target_modules="q_proj,v_proj,o_proj")


@pytest.fixture(scope="module")
def data12(data_dir, tmp_path_factory):
    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:12]
    path = tmp_path_factory.mktemp("ddp") / "train12.json"
    path.write_text(json.dumps(records))
    return path


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tiny_model_dir, data12, tmp_path):
    from lorakit.train.finetune import finetune

    one = tmp_path / "one"
    finetune(build_config(FinetuneConfig, dict(base_model=str(tiny_model_dir), data_path=str(data12),
                                               output_dir=str(one), micro_batch_size=4, **COMMON)))
    two = tmp_path / "two"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    proc = subprocess.run([sys.executable, "-m", "lorakit", "finetune", "--nproc", "2", "--base-model",
                           str(tiny_model_dir), "--data-path", str(data12), "--output-dir", str(two),
                           "--micro-batch-size", "2", *flags],
                          capture_output=True, text=True, timeout=300, env=worker_env(2, cpu_count=2))
    assert proc.returncode == 0, proc.stderr[-3000:]  # torchrun fails if either rank fails
    assert "launching 2 processes" in proc.stderr
    # Both ranks trained in a 2-process group; only rank 0 printed the summary and wrote outputs.
    assert proc.stdout.count("done: 2 steps") == 1, proc.stdout
    assert (two / "adapter_model.safetensors").is_file() and (two / "loss.png").is_file()
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["peak_rss_mb_all"] > 1.5 * summary["peak_rss_mb"]
    # tokens are gathered from both processes once per step: the same count as one process's
    assert summary["tokens_seen"] == json.loads((one / "train_summary.json").read_text())["tokens_seen"] > 0

    log_one, log_two = _log(one), _log(two)
    train_one = [(r["step"], r["loss"]) for r in log_one if "loss" in r]
    train_two = [(r["step"], r["loss"]) for r in log_two if "loss" in r]
    assert [s for s, _ in train_two] == [s for s, _ in train_one] == [1, 2]  # each step logged once
    for (_, a), (_, b) in zip(train_one, train_two, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    eval_one = [r["eval_loss"] for r in log_one if "eval_loss" in r]
    eval_two = [r["eval_loss"] for r in log_two if "eval_loss" in r]
    assert len(eval_two) == len(eval_one) >= 1
    assert eval_two[-1] == pytest.approx(eval_one[-1], rel=1e-4)

    w_one, w_two = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert w_one.keys() == w_two.keys()
    moved = 0.0
    for k in w_one:
        torch.testing.assert_close(w_two[k], w_one[k], atol=1e-5, rtol=1e-4)
        if "lora_B" in k:
            moved = max(moved, float(w_one[k].abs().max()))
    assert moved > 1e-3  # two Adam steps at lr 1e-2 moved B away from zero: the match is not trivial


def test_ddp_synchronises_only_the_trainable_weights(tiny_model_dir):
    """Frozen weights and buffers are left out of DDP's broadcasts; LoRA weights keep their all-reduce."""
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from lorakit.models import load_model
    from lorakit.train.config import LoraOptions
    from lorakit.train.distributed import ddp_skip_frozen
    from lorakit.train.engine import lora_config

    model = get_peft_model(load_model(tiny_model_dir, torch.float32), lora_config(LoraOptions()))
    ddp_skip_frozen(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        synced = {n for n, _ in model.named_parameters() if n not in ddp.parameters_to_ignore}
        assert synced == {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_A" in n for n in synced) and not any("embed_tokens" in n for n in synced)
        assert {n for n, _ in model.named_buffers()} <= ddp.parameters_to_ignore
    finally:
        dist.destroy_process_group()


def test_torchrun_command_and_worker_threads():
    cmd = torchrun_command("finetune", "/tmp/x.yaml", 3)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "lorakit",
                       "finetune", "/tmp/x.yaml"]
    assert worker_env(2, cpu_count=8)["OMP_NUM_THREADS"] in ("4", __import__("os").environ.get("OMP_NUM_THREADS"))


def test_nproc_refuses_a_batch_that_does_not_split(tiny_model_dir, data12, tmp_path):
    from lorakit.errors import ConfigError
    from lorakit.train.launch import relaunch_if_needed

    cfg = build_config(FinetuneConfig, dict(base_model=str(tiny_model_dir), data_path=str(data12),
                                            output_dir=str(tmp_path), batch_size=6, micro_batch_size=2, nproc=2))
    with pytest.raises(ConfigError, match="multiple of --micro-batch-size 2 x 2 process"):
        relaunch_if_needed(cfg, "finetune")


def test_examples_load_with_lorakit_and_accelerate(tiny_model_dir):
    """examples/finetune_alpaca.yaml goes through lorakit's own loader; the accelerate configs through
    accelerate's (unknown keys are refused there)."""
    from accelerate.commands.config.config_args import ClusterConfig

    from lorakit.config import load_yaml_config
    from lorakit.train.config import gradient_accumulation_steps

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"
    cfg = build_config(FinetuneConfig, load_yaml_config(root / "finetune_alpaca.yaml"))
    assert (cfg.lora_target_modules, cfg.batch_size, cfg.padding_free, cfg.precision) == \
        (["q_proj", "v_proj"], 128, True, "auto")
    assert gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size, 2) == 16
    kinds = {}
    for path in sorted((root / "accelerate").glob("*.yaml")):
        c = ClusterConfig.from_yaml_file(path)
        kinds[path.stem] = str(c.distributed_type.value)
        assert c.mixed_precision == "no"  # lorakit chooses the precision
    assert kinds == {"ddp": "MULTI_GPU", "ddp_cpu": "MULTI_CPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                     "deepspeed_zero3": "DEEPSPEED"}
