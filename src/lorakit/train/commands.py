"""`lorakit finetune` and `lorakit pretrain` as commands: relaunch as several processes when asked, else train
here and print the result.

The relaunch decision comes before anything imports the training stack (transformers' Trainer, peft:
~3.5 s here), so a parent that only starts torchrun and waits costs a fraction of a second before the
workers begin their own imports."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lorakit.train.config import FinetuneConfig
from lorakit.train.launch import relaunch_if_needed
from lorakit.train.pretrain_config import PretrainConfig

if TYPE_CHECKING:
    from lorakit.train.engine import TrainSummary


def _train_command(cfg: Any, verb: str, train_here: Callable[[Any], TrainSummary], next_step: str) -> int:
    """Run `verb` (several processes under torchrun, or `train_here(cfg)`); rank 0 prints the summary and
    `next_step` with {out} as the adapter folder."""
    code = relaunch_if_needed(cfg, verb)
    if code is not None:
        return code
    from lorakit.train.engine import is_main_process

    summary = train_here(cfg)
    if is_main_process():
        print(summary.describe())
        print(f"adapter: {summary.output_dir} (loss plot: {summary.output_dir}/loss.png)")
        print(next_step.format(out=summary.output_dir))
    return 0


def run_finetune(cfg: FinetuneConfig) -> int:
    def train_here(cfg: FinetuneConfig) -> TrainSummary:
        from lorakit.train.finetune import finetune

        return finetune(cfg)

    return _train_command(cfg, "finetune", train_here,
                          f"try it:  lorakit generate --base-model {cfg.base_model} --lora-weights {{out}} "
                          f"--prompt-template {cfg.prompt_template} --instruction '...'")


def run_pretrain(cfg: PretrainConfig) -> int:
    def train_here(cfg: PretrainConfig) -> TrainSummary:
        from lorakit.train.pretrain import pretrain

        return pretrain(cfg)

    return _train_command(cfg, "pretrain", train_here,
                          f"merge it: lorakit merge --base-model {cfg.base_model} --lora-weights {{out}} ...")
