"""HF Trainer subclasses the engine picks from: token counting once per optimizer step, checkpoints that
are complete or ignored (checkpoints.py), and the balanced training order of data/balance.py for
padding-free runs."""

from __future__ import annotations

import torch
from transformers import Trainer

from lorakit.data.balance import BalancedOrder
from lorakit.train.checkpoints import CompleteCheckpoints
from lorakit.train.fsdp import enable_fsdp_on_cpu


class TokenCountingTrainer(CompleteCheckpoints, Trainer):
    """HF Trainer counting the tokens seen as it does ("non_padding"), but gathering the count of all
    processes once per optimizer step instead of after every micro-batch: each gather is a point where
    the processes wait for each other, and after the last micro-batch of a step the gradients'
    all-reduce has just lined them up anyway (docs/performance.md#fewer-waits-between-processes)."""

    _tokens_pending = 0  # tokens of this process's micro-batches since the last optimizer step

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)  # --fsdp on CPU (see fsdp.py)

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


class BalancedTrainer(TokenCountingTrainer):
    """Training order from `BalancedOrder`: the same random global batches, split into micro-batches of
    equal work, so that under DDP no process waits long for another."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        lengths = dataset.lengths.tolist() if hasattr(dataset, "lengths") else [len(f["input_ids"]) for f in dataset]
        return BalancedOrder(lengths, self.args.per_device_train_batch_size,
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
