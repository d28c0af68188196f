"""`lorakit finetune` and `lorakit pretrain` as commands: relaunch as several processes when asked, else train
here and print the result.

The relaunch decision comes before anything imports the training stack (transformers' Trainer, peft:
~3.5 s here), so a parent that only starts torchrun and waits costs a fraction of a second before the
workers begin their own imports."""

from __future__ import annotations

from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import relaunch_if_needed
from lorakit.train.pretrain_config import PretrainConfig


def run_finetune(cfg: FinetuneConfig) -> int:
    code = relaunch_if_needed(cfg, "finetune")  # several processes: this command again under torchrun
    if code is not None:
        return code
    from lorakit.train.engine import is_main_process
    from lorakit.train.finetune import finetune

    summary = finetune(cfg)
    if is_main_process():
        print(summary.describe())
        print(f"adapter: {summary.output_dir} (loss plot: {summary.output_dir}/loss.png)")
        print(f"try it:  lorakit generate --base-model {cfg.base_model} --lora-weights {summary.output_dir} "
              f"--prompt-template {cfg.prompt_template} --instruction '...'")
    return 0


def run_pretrain(cfg: PretrainConfig) -> int:
    code = relaunch_if_needed(cfg, "pretrain")
    if code is not None:
        return code
    from lorakit.train.engine import is_main_process
    from lorakit.train.pretrain import pretrain

    summary = pretrain(cfg)
    if is_main_process():
        print(summary.describe())
        print(f"adapter: {summary.output_dir} (loss plot: {summary.output_dir}/loss.png)")
        print(f"merge it: lorakit merge --base-model {cfg.base_model} --lora-weights {summary.output_dir} ...")
    return 0
