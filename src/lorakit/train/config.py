"""Options of `lorakit finetune` and `lorakit eval` (alpaca-lora's defaults where it has one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.data.cache_options import DataPrepOptions
from lorakit.errors import ConfigError
from lorakit.models.quantize import validate_quantization
from lorakit.options import ModelOptions, Precision, PromptDataOptions, QuantizationOptions, adapter_option
from lorakit.train.distributed_config import DistributedOptions


@dataclass
class LoraOptions:
    """LoRA options: rank, alpha, dropout, target modules, modules to save."""

    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] = opt(["q_proj", "v_proj"], "modules to adapt: a comma list or all-linear")
    modules_to_save: list[str] = opt([], "modules trained fully and saved with the adapter (e.g. embed_tokens,lm_head)")
    use_rslora: bool = opt(False, "rank-stabilised LoRA scaling alpha/sqrt(r)")

    def validate_lora(self) -> None:
        if self.lora_r < 1:
            raise ConfigError("--lora-r must be >= 1")
        if not 0.0 <= self.lora_dropout < 0.999:
            raise ConfigError(f"--lora-dropout must be in [0, 0.999), got {self.lora_dropout}")


@dataclass
class TrainOptions(DistributedOptions):
    """Training options shared by finetune and pretrain: batches, schedule, precision, checkpoints, output
    (and, inherited, where the processes run: distributed_config.py)."""

    output_dir: str = opt("./lora-alpaca", "where the adapter, logs, plot and checkpoints go")
    batch_size: int = opt(128, "global batch size (examples per optimizer step, via gradient accumulation)")
    micro_batch_size: int = opt(4, "examples per forward pass and process")
    num_epochs: float = opt(3.0, "epochs over the training data")
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides --num-epochs when > 0)")
    learning_rate: float = opt(3e-4, "peak learning rate")
    warmup_steps: int = opt(100, "linear warm-up steps")
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up (linear, cosine, constant, ...)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    val_set_size: int = opt(2000, "examples held out for evaluation (0: none)")
    group_by_length: bool = opt(False, "batch examples of similar length together")
    padding_free: bool = opt(True, "flatten each micro-batch into one row without padding (faster, same result)")
    precision: Precision = opt("auto", "compute precision: auto (bf16 where the hardware supports it), fp32, "
                                        "bf16 or fp16 (frozen base weights and matmuls; LoRA weights stay fp32)")
    resume_from_checkpoint: str | None = opt(None, "a trainer checkpoint folder (exact resume), 'last' (the newest "
                                                   "in --output-dir), or an adapter folder (weights only)")
    seed: int = opt(42, "random seed (data order, LoRA init, dropout)")
    gradient_checkpointing: bool = opt(False, "recompute each layer's activations in the backward pass instead of "
                                              "keeping them (less activation memory, slower steps)")
    report_to: Literal["none", "tensorboard", "wandb"] = opt("none", "where to send training metrics")
    logging_steps: int = opt(10, "log every N optimizer steps")
    save_steps: int = opt(200, "save a checkpoint every N steps")
    eval_steps: int = opt(200, "evaluate every N steps (with a validation set)")
    save_total_limit: int = opt(3, "checkpoints kept")
    overwrite: bool = opt(False, "allow an --output-dir that already holds a finished adapter")
    nproc: str = opt("auto", "processes to train with (DDP): N, or auto: one per core when training on a CPU "
                            "for more than about 25 seconds and memory allows, else 1. >1 re-launches this "
                            "command through torchrun (under torchrun or accelerate launch, leave it at auto)")

    def validate_train(self) -> None:
        if self.micro_batch_size < 1 or self.batch_size < self.micro_batch_size:
            raise ConfigError("--batch-size must be >= --micro-batch-size >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}")
        if self.learning_rate <= 0:
            raise ConfigError("--learning-rate must be positive")
        if self.nproc != "auto" and not (str(self.nproc).isdigit() and int(self.nproc) >= 1):
            raise ConfigError(f"--nproc must be auto or a number >= 1, got {self.nproc!r}")
        self.validate_distributed()


@dataclass
class FinetuneConfig(DataPrepOptions, TrainOptions, LoraOptions, PromptDataOptions, QuantizationOptions, ModelOptions):
    """Everything `lorakit finetune` needs; every field is a flag and a YAML key."""

    def validate(self) -> None:
        self.validate_data()
        self.validate_train()
        self.validate_lora()
        self.validate_data_prep()
        validate_quantization(self, self.nproc)


@dataclass
class EvalConfig(PromptDataOptions, QuantizationOptions, ModelOptions):
    """Options of `lorakit eval`."""

    lora_weights: list[str] = adapter_option("adapter folder(s) to apply, in order")
    micro_batch_size: int = opt(8, "examples per forward pass")
    exact_match: bool = opt(False, "also generate answers and report exact-match accuracy against the outputs")
    max_new_tokens: int = opt(64, "generation length for --exact-match")
    limit: int = opt(0, "evaluate only the first N examples (0: all)")
    precision: Precision = opt("fp32", "compute precision of the evaluation: fp32, bf16 or auto")
    backend: Literal["torch", "llamacpp"] = opt("torch", "llamacpp: logits from llama.cpp (a .gguf base as it is, "
                                                         "e.g. quantized; adapters as GGUF LoRA); a .txt data file "
                                                         "is then scored as raw text")

    def validate(self) -> None:
        self.validate_data()
        validate_quantization(self)


def gradient_accumulation_steps(batch_size: int, micro_batch_size: int, n_processes: int) -> int:
    """alpaca-lora's rule: global batch = micro batch x accumulation x processes."""
    steps = batch_size // (micro_batch_size * n_processes)
    if steps < 1 or steps * micro_batch_size * n_processes != batch_size:
        raise ConfigError(f"--batch-size {batch_size} must be a multiple of --micro-batch-size "
                          f"{micro_batch_size} x {n_processes} process(es)")
    return steps
