"""Which process this is under torchrun/accelerate, and what the processes share.

Imports nothing heavy at module level: the train verbs ask `is_main_process` before the training stack
is imported (see commands.py).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def across_processes(value: Any) -> list[Any]:
    """`value` of every process (all must call this), or [value] outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def end_process_group() -> None:
    """Leave the process group once training is done (a no-op outside one).

    Without it the gloo/nccl threads are torn down while the interpreter exits, which now and then aborts
    a worker ("terminate called without an active exception", SIGABRT) after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process leaves while another still gathers the adapter or writes the plot
        dist.destroy_process_group()


def world_size() -> int:
    """Number of training processes (WORLD_SIZE; 1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0 (and outside a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def ddp_skip_frozen(model: torch.nn.Module) -> None:
    """Leave frozen weights and buffers out of DDP's synchronisation.

    Every process loaded the same base weights, and the buffers (rotary frequencies) are constants, yet
    DDP broadcasts all of them from rank 0 when it wraps the model and the buffers again before every
    forward (docs/performance.md#fewer-waits-between-processes).
    Only the trainable (LoRA) parameters need their gradients averaged."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [name for name, _ in model.named_buffers()])
