"""`--fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) through HF Trainer and accelerate, on GPUs and CPUs.

Trainer passes `fsdp="full_shard"` + `fsdp_config={"version": 2}` to accelerate, which wraps every decoder
layer and then the whole model with `fully_shard`: each process keeps 1/N of every weight (frozen base,
LoRA, fully trained embeddings) and of the optimizer state, and gathers a layer's weights only while it
runs. At the end accelerate gathers the full state dict to rank 0 (`get_model_state_dict(full_state_dict,
cpu_offload)`: the other ranks get an empty dict), and rank 0 saves the adapter as usual.

On CPU accelerate chooses MULTI_CPU (DDP over gloo) and drops the FSDP plugin: its FSDP switch only looks
at accelerator devices (accelerate 1.16 `AcceleratorState.__init__`). FSDP2 itself runs on CPU with gloo
(forward, backward's reduce-scatter, AdamW), so `enable_fsdp_on_cpu` puts the plugin back after the
Accelerator is built, before anything is prepared: from then on accelerate takes its FSDP2 path
(`fsdp2_prepare_model`, the FSDP2 state dict) exactly as on GPUs.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lorakit")


def fsdp_arguments(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for --fsdp: FSDP2, one shard unit per decoder layer (the model's `_no_split_modules`),
    weights freed again after each layer's forward, a full (gathered) state dict for saving."""
    if not enabled:
        return {}
    return {"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                  "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                  "state_dict_type": "FULL_STATE_DICT"}}


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """After `Trainer.create_accelerator_and_postprocess`: restore the FSDP2 plugin accelerate dropped on CPU."""
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    if not plugin_args or trainer.is_fsdp_enabled:
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.NO:
        log.warning("--fsdp with one process: nothing to shard over (give --nproc N, or launch with torchrun)")
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # as accelerate does when it chooses FSDP itself: a later AcceleratorState() copies PartialState's choice
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    log.info("FSDP2 on CPU: fully_shard over %d gloo processes", state.num_processes)

