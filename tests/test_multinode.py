"""Training across machines, on one machine: two "nodes" on loopback (two `lorakit finetune --nnodes 2`
launches, one process each, static rendezvous at 127.0.0.1) must train the same adapter as one node with
two processes (`--nproc 2`, torchrun --standalone), which tests/test_ddp.py checks against one process.

The global batch is the whole training set, so each optimizer step's gradient does not depend on which
process sees which example: the runs may differ only in how the ranks came together. A node that trained
alone (no rendezvous), or a batch not split over the two machines, would take different steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import build_config
from lorakit.errors import ConfigError
from lorakit.train.config import FinetuneConfig
from lorakit.train.distributed_config import rendezvous_args
from lorakit.train.launch import torchrun_command, worker_env
from servers import free_port

COMMON = dict(precision="fp32", lora_dropout=0.0, batch_size=8, micro_batch_size=2, num_epochs=2,
              learning_rate=1e-2, warmup_steps=0, val_set_size=0, cutoff_len=64, prompt_template="alpaca_short",
              logging_steps=1, save_steps=100, lora_target_modules="q_proj,v_proj,o_proj")


@pytest.fixture(scope="module")
def data8(data_dir, tmp_path_factory):
    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:8]
    path = tmp_path_factory.mktemp("nodes") / "train8.json"
    path.write_text(json.dumps(records))
    return path


def _finetune(model, data, out, *extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    return [sys.executable, "-m", "lorakit", "finetune", "--base-model", str(model), "--data-path", str(data),
            "--output-dir", str(out), *flags, *extra]


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_nodes_on_loopback_match_one_node_with_two_processes(tiny_model_dir, data8, tmp_path):
    env = worker_env(1, cpu_count=1)
    one_node = tmp_path / "one_node"
    reference = subprocess.Popen(_finetune(tiny_model_dir, data8, one_node, "--nproc", "2"), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = free_port()
    outs = [tmp_path / "node0", tmp_path / "node1"]
    nodes = [subprocess.Popen(_finetune(tiny_model_dir, data8, outs[rank], "--nproc", "1", "--nnodes", "2",
                                        "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                                        "--master-port", str(port)),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in (reference, *nodes)]
    for p, (_stdout, stderr) in zip((reference, *nodes), results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    _, (node0_out, node0_err), (node1_out, _) = results
    assert "on node 0 of 2" in node0_err and "--nnodes=2" in node0_err and "--master-addr=127.0.0.1" in node0_err
    # one process group of two: rank 0 (node 0) alone prints the summary and writes the adapter
    assert node0_out.count("done: 2 steps") == 1 and "done:" not in node1_out
    assert (outs[0] / "adapter_model.safetensors").is_file()
    assert not (outs[1] / "adapter_model.safetensors").exists()
    assert json.loads((outs[0] / "train_summary.json").read_text())["processes"] == 2

    assert _losses(outs[0]) == pytest.approx(_losses(one_node), rel=1e-5) and len(_losses(one_node)) == 2
    w_ref, w_nodes = load_file(one_node / "adapter_model.safetensors"), load_file(outs[0] / "adapter_model.safetensors")
    assert w_ref.keys() == w_nodes.keys()
    for k in w_ref:
        torch.testing.assert_close(w_nodes[k], w_ref[k], atol=1e-6, rtol=1e-5)
    assert max(float(w_ref[k].abs().max()) for k in w_ref if "lora_B" in k) > 1e-3  # training moved B


def test_rendezvous_flags_reach_torchrun(tmp_path):
    def cfg(**kw):
        return build_config(FinetuneConfig, dict(base_model="x", data_path="d.json", output_dir=str(tmp_path), **kw))

    assert rendezvous_args(cfg()) == ["--standalone"] and not cfg().multi_node
    static = cfg(nnodes=4, node_rank=3, master_addr="10.0.0.1", master_port=29400)
    assert torchrun_command("pretrain", "/tmp/o.yaml", 2, static)[3:] == [
        "--nnodes=4", "--node-rank=3", "--master-addr=10.0.0.1", "--master-port=29400", "--nproc-per-node=2",
        "-m", "lorakit", "pretrain", "/tmp/o.yaml"]
    assert rendezvous_args(cfg(nnodes=2, rdzv_endpoint="head:29400")) == [
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=lorakit"]
    for bad, match in [(dict(nnodes=2), "address of node 0"), (dict(nnodes=2, node_rank=2, master_addr="h"),
                                                                "--node-rank must be in 0..1"),
                       (dict(nnodes=0), "--nnodes"), (dict(rdzv_endpoint="h:1", master_addr="h"), "not both"),
                       (dict(rdzv_endpoint="head"), "HOST:PORT")]:
        with pytest.raises(ConfigError, match=match):
            cfg(**bad)


def test_multi_node_auto_starts_one_process_per_machine_and_splits_the_batch_over_all(tmp_path):
    from lorakit.train.launch import relaunch_if_needed, resolve_nproc

    base = dict(base_model="x", data_path="d.json", output_dir=str(tmp_path), nnodes=3, master_addr="h")
    assert resolve_nproc(build_config(FinetuneConfig, base)) == 1
    with pytest.raises(ConfigError, match="multiple of --micro-batch-size 2 x 6 process"):
        relaunch_if_needed(build_config(FinetuneConfig, dict(base, nproc=2, batch_size=8, micro_batch_size=2)),
                           "finetune")
