"""`lorakit finetune` and `lorakit pretrain` as commands: relaunch as several processes when asked, else train
here and print the result.

The relaunch decision comes before anything imports the training stack (transformers' Trainer, peft:
~3.5 s here), so a parent that only starts torchrun and waits costs a fraction of a second before the
workers begin their own imports."""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Callable
from typing import Any

from lorakit.train.checkpoints import refuse_named_incomplete
from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import relaunch_if_needed
from lorakit.train.pretrain_config import PretrainConfig


def _train_command(cfg: Any, verb: str, next_step: Callable[[Any, str], list[str]]) -> int:
    """Run `verb` (several processes under torchrun, or lorakit.train.<verb>.<verb>(cfg) here); rank 0
    prints the summary and the command line `next_step(cfg, adapter_folder)` to run next."""
    refuse_named_incomplete(cfg.resume_from_checkpoint)  # one line now, not after loading the model
    code = relaunch_if_needed(cfg, verb)
    if code is not None:
        return code
    from lorakit.train.distributed import end_process_group, is_main_process

    train_here = getattr(importlib.import_module(f"lorakit.train.{verb}"), verb)  # finetune.finetune, ...
    summary = train_here(cfg)
    end_process_group()
    if is_main_process():
        print(summary.describe())
        print(f"adapter: {summary.output_dir} (loss plot: {summary.output_dir}/loss.png)")
        print("next:", shlex.join(next_step(cfg, str(summary.output_dir))))
    return 0


def after_finetune(cfg: FinetuneConfig, adapter: str) -> list[str]:
    """The command line printed after `finetune`: try the adapter (tested to parse with the real CLI)."""
    return ["lorakit", "generate", "--base-model", cfg.base_model, "--lora-weights", adapter,
            "--prompt-template", cfg.prompt_template, "--instruction", "Name three rivers."]


def after_pretrain(cfg: PretrainConfig, adapter: str) -> list[str]:
    """The command line printed after `pretrain`: merge the adapter (and its extended vocabulary) into the base."""
    return ["lorakit", "merge", "--base-model", cfg.base_model, "--lora-weights", adapter,
            "--output-dir", f"{adapter.rstrip('/')}-merged"]


def run_finetune(cfg: FinetuneConfig) -> int:
    """The `lorakit finetune` verb (relaunched under torchrun when --nproc asks); returns the exit code."""
    return _train_command(cfg, "finetune", after_finetune)


def run_pretrain(cfg: PretrainConfig) -> int:
    """The `lorakit pretrain` verb (relaunched under torchrun when --nproc asks); returns the exit code."""
    return _train_command(cfg, "pretrain", after_pretrain)
