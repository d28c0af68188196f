"""`lorakit finetune` and `lorakit pretrain` as commands: relaunch as several processes when asked, else train
here and print the result.

The relaunch decision comes before anything imports the training stack (transformers' Trainer, peft:
~3.5 s here), so a parent that only starts torchrun and waits costs a fraction of a second before the
workers begin their own imports."""

from __future__ import annotations

import importlib
from typing import Any

from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import relaunch_if_needed
from lorakit.train.pretrain_config import PretrainConfig


def _train_command(cfg: Any, verb: str, next_step: str) -> int:
    """Run `verb` (several processes under torchrun, or lorakit.train.<verb>.<verb>(cfg) here); rank 0
    prints the summary and `next_step` with {out} as the adapter folder."""
    code = relaunch_if_needed(cfg, verb)
    if code is not None:
        return code
    from lorakit.train.distributed import is_main_process

    train_here = getattr(importlib.import_module(f"lorakit.train.{verb}"), verb)  # finetune.finetune, ...
    summary = train_here(cfg)
    if is_main_process():
        print(summary.describe())
        print(f"adapter: {summary.output_dir} (loss plot: {summary.output_dir}/loss.png)")
        print(next_step.format(out=summary.output_dir))
    return 0


def run_finetune(cfg: FinetuneConfig) -> int:
    """The `lorakit finetune` verb (relaunched under torchrun when --nproc asks); returns the exit code."""
    return _train_command(cfg, "finetune",
                          f"try it:  lorakit generate --base-model {cfg.base_model} --lora-weights {{out}} "
                          f"--prompt-template {cfg.prompt_template} --instruction '...'")


def run_pretrain(cfg: PretrainConfig) -> int:
    """The `lorakit pretrain` verb (relaunched under torchrun when --nproc asks); returns the exit code."""
    return _train_command(cfg, "pretrain",
                          f"merge it: lorakit merge --base-model {cfg.base_model} --lora-weights {{out}} ...")
