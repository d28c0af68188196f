"""train/distributed.py: what the training processes share, and leaving their process group cleanly."""

from __future__ import annotations

import torch.distributed as dist

from lorakit.train.distributed import across_processes, end_process_group


def test_outside_a_process_group():
    assert not dist.is_initialized()
    assert across_processes(3) == [3]
    end_process_group()  # a no-op, not an error


def test_end_process_group_leaves_the_group(tmp_path):
    # A worker that exits with its gloo group still alive may abort in teardown (SIGABRT after a good run):
    # the train verbs leave the group themselves.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert across_processes("a") == ["a"]
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
