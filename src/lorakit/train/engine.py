"""The training engine shared by `finetune` and `pretrain`: LoRA on HF Trainer (via accelerate).

HF Trainer brings gradient accumulation, checkpoints with optimizer/scheduler/RNG state (exact
resume), DDP/FSDP/DeepSpeed under torchrun/accelerate, evaluation and TensorBoard. This module adds
what alpaca-lora users had to get right by hand: the global batch split into micro-batches across
processes, padding-free batches with `use_cache=False`, fp32 LoRA weights under bf16, an output folder
with adapter + tokenizer + config + log + plot, and a check that the saved adapter is not empty. The
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
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from lorakit.config import save_yaml
from lorakit.data.balance import BalancedOrder
from lorakit.data.collators import make_collator
from lorakit.errors import ConfigError, LorakitError, OutputExistsError
from lorakit.files import write_atomic
from lorakit.models.rmsnorm import swap_rmsnorms
from lorakit.train.callbacks import JsonlLogCallback, LogFinalStepCallback, LossPlotCallback
from lorakit.train.config import LoraOptions, TrainOptions, gradient_accumulation_steps
from lorakit.train.lora_layers import speed_up_lora
from lorakit.train.loss import install_training_loss
from lorakit.train.memory import prepare_base
from lorakit.train.packed_attention import NAME as PACKED_ATTENTION
from lorakit.train.packed_attention import use_packed_attention
from lorakit.precision import resolve_precision

log = logging.getLogger("lorakit")
ADAPTER_FILE = "adapter_model.safetensors"
SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainSummary:
    output_dir: str
    global_step: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    tokens_seen: int
    tokens_per_second: float
    peak_rss_mb: float
    precision: str
    trainable_params: int
    extra: dict[str, Any] = field(default_factory=dict)
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated of this process, when on CUDA
    processes: int = 1
    peak_rss_mb_all: float = 0.0  # sum of the processes' peaks (what the machine had to hold)
    cpu_seconds: float = 0.0  # CPU time of all processes while training

    def describe(self) -> str:
        """The one-line result printed by `finetune` and `pretrain`."""
        eval_part = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
        memory = (f"peak RSS {self.peak_rss_mb:.0f} MB" if self.processes == 1 else
                  f"{self.processes} processes, peak RSS {self.peak_rss_mb_all:.0f} MB in all")
        gpu = "" if self.peak_gpu_mb is None else f", peak GPU {self.peak_gpu_mb:.0f} MB"
        return (f"done: {self.global_step} steps, train loss {self.train_loss:.4f}{eval_part}, "
                f"{self.tokens_per_second:.0f} tokens/s, {memory}{gpu}, precision {self.precision}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (in DDP: of this rank) since it started, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def read_summary(output_dir: str | os.PathLike[str]) -> TrainSummary:
    """The TrainSummary a finished run wrote to its output folder."""
    return TrainSummary(**json.loads((Path(output_dir) / SUMMARY_FILE).read_text(encoding="utf-8")))


def across_processes(value: Any) -> list[Any]:
    """`value` of every process (all must call this), or [value] outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def lora_config(cfg: LoraOptions):
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
    if spec in ("last", "latest", "true", "True"):
        last = get_last_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(f"--resume-from-checkpoint {spec}: no checkpoint-* folder in {cfg.output_dir}")
        return last, None
    path = Path(spec)
    if (path / "trainer_state.json").is_file():
        return str(path), None
    if (path / "adapter_config.json").is_file():
        return None, str(path)
    raise ConfigError(f"--resume-from-checkpoint {spec}: neither a trainer checkpoint (trainer_state.json) "
                      "nor an adapter folder (adapter_config.json)")


def _load_adapter_weights(peft_model, adapter_dir: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise LorakitError(f"adapter {adapter_dir} does not fit this model/LoRA config: unexpected keys "
                           f"{result.unexpected_keys[:3]}")
    log.info("starting from the weights of adapter %s (optimizer and schedule start fresh)", adapter_dir)


def _check_saved_adapter(folder: Path, trainable: dict[str, torch.Tensor]) -> None:
    """Refuse an empty or all-zero adapter file (alpaca-lora's silent state_dict bug)."""
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
        keys = list(f.keys())
        lora_b = [f.get_tensor(k) for k in keys if "lora_B" in k]
    if not keys or len(keys) < len(trainable):
        raise LorakitError(f"saved adapter has {len(keys)} tensors, expected {len(trainable)}: not saved correctly")
    if lora_b and all(not t.any() for t in lora_b):
        log.warning("all LoRA B matrices are zero: the adapter does not change the model yet")


def _save_final(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, cfg: Any, out: Path,
                state_dict: dict[str, torch.Tensor]) -> None:
    """Adapter, tokenizer and config into a temp folder, checked, then moved into `out` file by file.

    `state_dict` is the full model's, gathered by accelerate (see `train`): PEFT keeps its adapter part."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Embeddings trained as modules_to_save are saved as such; peft's extra "embedding layers" copy
    # (on by default after a vocab resize) would store them twice more, plus the untrained originals.
    full_embeddings = {"embed_tokens", "lm_head"} & set(getattr(cfg, "modules_to_save", None) or [])
    model.save_pretrained(str(tmp), state_dict=state_dict, save_embedding_layers=False if full_embeddings else "auto")
    tokenizer.save_pretrained(str(tmp))
    save_yaml(cfg, tmp / "lorakit_config.yaml")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _check_saved_adapter(tmp, trainable)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


class _Trainer(Trainer):
    """HF Trainer counting the tokens seen as it does ("non_padding"), but gathering the count of all
    processes once per optimizer step instead of after every micro-batch: each gather is a point where
    the processes wait for each other, and after the last micro-batch of a step the gradients'
    all-reduce has just lined them up anyway. Measured on 2 processes (SmolLM2-135M, 160 examples,
    interleaved): +1.3% tokens/s."""

    _tokens_pending = 0  # tokens of this process's micro-batches since the last optimizer step

    def _track_num_input_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
        if "attention_mask" in inputs:  # padded rows; padding-free rows have none (pad only at their end)
            tokens = inputs["attention_mask"].sum()
        else:
            pad = getattr(self.processing_class, "pad_token_id", None)
            ids = inputs["input_ids"]
            tokens = ids.numel() if pad is None else (ids != pad).sum()
        self._tokens_pending += int(tokens)
        if self.accelerator.sync_gradients:
            pending = torch.as_tensor(self._tokens_pending, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum())
            self._tokens_pending = 0


class _BalancedTrainer(_Trainer):
    """Training order from `BalancedOrder`: the same random global batches, split into micro-batches of
    equal work, so that under DDP no process waits long for another."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return BalancedOrder([len(f["input_ids"]) for f in dataset], self.args.per_device_train_batch_size,
                             self.args.gradient_accumulation_steps, self.args.world_size, seed)

    def get_train_dataloader(self):
        return expose_sampler(super().get_train_dataloader())


def expose_sampler(loader):
    """Let `set_epoch` reach a BalancedOrder inside accelerate's per-process batch sampler.

    accelerate looks for the sampler at `loader.batch_sampler.sampler` or, once a resumed run has wrapped
    the loader to skip the batches already trained, at `loader.batch_sampler.batch_sampler.sampler`; its
    BatchSamplerShard carries `.sampler` only for the random sampler it installs itself. Without it, a
    multi-process run resumed in epoch >= 1 would replay epoch 0's order."""
    shard = getattr(loader, "batch_sampler", None)
    inner = getattr(getattr(shard, "batch_sampler", None), "sampler", None)
    if isinstance(inner, BalancedOrder):
        shard.sampler = inner
    return loader


def _ddp_skip_frozen(model: torch.nn.Module) -> None:
    """Leave frozen weights and buffers out of DDP's synchronisation.

    Every process loaded the same base weights, and the buffers (rotary frequencies) are constants, yet
    DDP broadcasts all of them from rank 0 when it wraps the model (270 MB for SmolLM2-135M in bf16) and
    the buffers again before every forward, which makes each micro-batch wait for the slowest process.
    Only the trainable (LoRA) parameters need their gradients averaged."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [name for name, _ in model.named_buffers()])


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
    )


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
    if not train_data:
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
    if world_size() > 1:
        _ddp_skip_frozen(peft_model)
    if start_adapter:
        _load_adapter_weights(peft_model, start_adapter)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("trainable params: %s of %s (%.3f%%); precision %s; %d process(es)", f"{trainable:,}",
             f"{total:,}", 100 * trainable / total, precision, world_size())

    args = _training_args(cfg, out, precision, has_eval=bool(eval_data))
    plot = LossPlotCallback(out / "loss.png")
    callbacks = [JsonlLogCallback(out / "train_log.jsonl"), plot, LogFinalStepCallback()]
    balanced = cfg.padding_free and collator is None and not cfg.group_by_length
    trainer_class = _BalancedTrainer if balanced else _Trainer
    trainer = trainer_class(model=peft_model, args=args, train_dataset=list(train_data),
                            eval_dataset=list(eval_data) if eval_data else None,
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
        _save_final(trainer, tokenizer, cfg, out, state_dict)
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
