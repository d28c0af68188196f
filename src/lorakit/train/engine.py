"""The training engine shared by `finetune` and `pretrain`: LoRA on HF Trainer (via accelerate).

HF Trainer brings gradient accumulation, checkpoints with optimizer/scheduler/RNG state (exact
resume), DDP/FSDP/DeepSpeed under torchrun/accelerate, evaluation and TensorBoard. This module adds
what alpaca-lora users had to get right by hand: the global batch split into micro-batches across
processes, padding-free batches with `use_cache=False`, fp32 LoRA weights under bf16, an output folder
with adapter + tokenizer + config + log + plot, and a check that the saved adapter is not empty
(saving.py), and a summary of the run (summary.py); the Trainer subclasses are in trainers.py. The
CPU-speed pieces it installs (per-example attention, cheaper LoRA dropout, the lm_head fused with the
loss, RMSNorm with a hand-written backward) live in packed_attention.py, lora_layers.py, loss.py and
models/rmsnorm.py, each tested against the computation it replaces. Under DDP (`--nproc`, on a CPU
machine by default: see launch.py) micro-batches of equal work (data/balance.py) and a DDP that
synchronises only the trainable weights keep the processes from waiting for each other.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments, set_seed

from lorakit.data.collators import make_collator
from lorakit.errors import ConfigError, LorakitError, OutputExistsError
from lorakit.files import write_atomic
from lorakit.models.rmsnorm import swap_rmsnorms
from lorakit.precision import resolve_precision
from lorakit.train.callbacks import JsonlLogCallback, LogFinalStepCallback, LossPlotCallback
from lorakit.train.checkpoints import LAST, check_checkpoint, is_checkpoint_dir, latest_complete_checkpoint
from lorakit.train.config import LoraOptions, TrainOptions, gradient_accumulation_steps
from lorakit.train.distributed import across_processes, ddp_skip_frozen, is_main_process, world_size
from lorakit.train.fsdp import fsdp_arguments
from lorakit.train.lora_layers import speed_up_lora
from lorakit.train.loss import install_training_loss
from lorakit.train.memory import prepare_base
from lorakit.train.packed_attention import NAME as PACKED_ATTENTION
from lorakit.train.packed_attention import use_packed_attention
from lorakit.train.saving import ADAPTER_FILE, load_adapter_weights, save_final
from lorakit.train.summary import SUMMARY_FILE, TrainSummary, peak_rss_mb
from lorakit.train.trainers import BalancedTrainer, TokenCountingTrainer

log = logging.getLogger("lorakit")


def lora_config(cfg: LoraOptions):
    """LoraOptions -> peft.LoraConfig for a causal LM."""
    from peft import LoraConfig, TaskType

    targets = cfg.lora_target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=cfg.modules_to_save or None, use_rslora=cfg.use_rslora, bias="none",
    )


def _resume_target(cfg: TrainOptions) -> tuple[str | None, str | None]:
    """(trainer checkpoint to resume, adapter folder to start from); at most one is set."""
    spec = cfg.resume_from_checkpoint
    if not spec:
        return None, None
    if spec in LAST:  # the newest complete one (checkpoints.py)
        return latest_complete_checkpoint(cfg.output_dir, spec), None
    path = Path(spec)
    if is_checkpoint_dir(path) or (path / "trainer_state.json").is_file():
        return check_checkpoint(path), None
    if (path / "adapter_config.json").is_file():
        return None, str(path)
    raise ConfigError(f"--resume-from-checkpoint {spec}: neither a trainer checkpoint (trainer_state.json) "
                      "nor an adapter folder (adapter_config.json)")


def _training_args(cfg: TrainOptions, out: Path, precision: str, has_eval: bool) -> TrainingArguments:
    accumulation = gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size, world_size())
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        # --streaming: each process reads the stream and keeps its share (accelerate's IterableDatasetShard);
        # dispatching would concatenate the processes' batches, which packed rows of unequal length are not
        accelerator_config={"dispatch_batches": False} if getattr(cfg, "streaming", False) else None,
        **fsdp_arguments(getattr(cfg, "fsdp", False)),
    )


def _dataset(data: Sequence[Any]) -> Any:
    """A torch Dataset as it is (pretrain's blocks are views into a memory map), any other sequence as a list."""
    return data if isinstance(data, torch.utils.data.Dataset) else list(data)


def train(cfg: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
          train_data: Sequence[dict[str, list[int]]], eval_data: Sequence[dict[str, list[int]]] | None = None,
          collator: Any = None) -> TrainSummary:
    """Wrap `model` with LoRA per `cfg` (LoraOptions + TrainOptions), train, and save the adapter folder."""
    from peft import get_peft_model

    out = Path(cfg.output_dir)
    checkpoint, start_adapter = _resume_target(cfg)
    if (out / ADAPTER_FILE).exists() and not (cfg.overwrite or checkpoint):
        raise OutputExistsError(f"{out} already holds a trained adapter; pass --overwrite, "
                                "or --resume-from-checkpoint last to continue its run")
    if hasattr(train_data, "__len__") and not len(train_data):  # a streamed dataset has no length
        raise ConfigError("no training examples left after tokenization")
    precision = resolve_precision(cfg.precision)
    out.mkdir(parents=True, exist_ok=True)

    model.config.use_cache = False  # required for correct per-example attention in packed rows
    model = prepare_base(model, cfg, world_size())  # quantized base, gradient checkpointing (memory.py)
    install_training_loss(model)  # the same loss, fused with the lm_head: no [tokens x vocab] logits
    swap_rmsnorms(model)  # the same norms with a one-expression backward
    if cfg.padding_free and collator is None and use_packed_attention(model):
        log.info("padding-free batches: attention runs per example (%s)", PACKED_ATTENTION)
    set_seed(cfg.seed)  # the LoRA A init draws from the global RNG: same seed, same run
    peft_model = get_peft_model(model, lora_config(cfg))
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights (and so optimizer state) stay fp32
    speed_up_lora(peft_model, precision)
    if world_size() > 1 and not getattr(cfg, "fsdp", False):
        ddp_skip_frozen(peft_model)
    if start_adapter:
        load_adapter_weights(peft_model, start_adapter)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("trainable params: %s of %s (%.3f%%); precision %s; %d process(es)", f"{trainable:,}",
             f"{total:,}", 100 * trainable / total, precision, world_size())

    args = _training_args(cfg, out, precision, has_eval=bool(eval_data))
    plot = LossPlotCallback(out / "loss.png")
    callbacks = [JsonlLogCallback(out / "train_log.jsonl"), plot, LogFinalStepCallback()]
    balanced = cfg.padding_free and collator is None and not cfg.group_by_length
    trainer_class = BalancedTrainer if balanced else TokenCountingTrainer
    trainer = trainer_class(model=peft_model, args=args, train_dataset=_dataset(train_data),
                            eval_dataset=_dataset(eval_data) if eval_data else None,
                            data_collator=collator or make_collator(tokenizer, padding_free=cfg.padding_free),
                            processing_class=tokenizer, callbacks=callbacks)
    if is_main_process() and not checkpoint:
        (out / "train_log.jsonl").unlink(missing_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # every process takes part here, before anything only rank 0 does (and could fail in)
    cpu_seconds_all, peak_rss_all = map(sum, zip(*across_processes((cpu_seconds, peak_rss_mb())), strict=True))
    # Trainer already evaluates at the last step (eval_strategy "steps"); evaluate again only if not.
    final_evals = [h["eval_loss"] for h in trainer.state.log_history
                   if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    if eval_data and not final_evals:
        final_evals = [trainer.evaluate()["eval_loss"]]
    eval_loss = final_evals[-1] if final_evals else None
    plot.draw(trainer.state)  # rank 0; a diverged run gets its curve too
    if not math.isfinite(result.training_loss):  # checkpoints stay; no finished-looking adapter is written
        raise LorakitError(f"training diverged (loss {result.training_loss}); lower --learning-rate")

    # Every rank takes part: under FSDP or DeepSpeed ZeRO-3 each holds only a shard of the weights, and
    # accelerate gathers the full state dict (a no-op unwrap under DDP or one process). Rank 0 writes.
    try:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    except ValueError as e:  # ZeRO-3 without gathering 16-bit weights on save
        raise LorakitError(f"the trained adapter could not be gathered for saving ({e}); set "
                           f"zero3_save_16bit_model: true in the accelerate config. The checkpoints in "
                           f"{out} hold the training state.") from e
    if trainer.is_world_process_zero():
        save_final(trainer, tokenizer, cfg, out, state_dict)
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    peak_rss = peak_rss_mb()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    summary = TrainSummary(output_dir=str(out), global_step=trainer.state.global_step,
                           train_loss=float(result.training_loss), eval_loss=eval_loss, train_seconds=seconds,
                           tokens_seen=tokens, tokens_per_second=tokens / seconds if seconds else 0.0,
                           peak_rss_mb=peak_rss, precision=precision, trainable_params=trainable,
                           peak_gpu_mb=peak_gpu, processes=world_size(), cpu_seconds=cpu_seconds_all,
                           # one process: its peak after saving too; several: their sum when training ended
                           peak_rss_mb_all=max(peak_rss_all, peak_rss))
    if is_main_process():  # for scripts and benchmarks: the printed summary, as numbers
        write_atomic(out / SUMMARY_FILE, json.dumps(asdict(summary), indent=1))
    return summary
